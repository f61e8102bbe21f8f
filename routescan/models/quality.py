"""How closely one model follows another: perplexity, greedy agreement, top-k routing agreement.

Used by the reference-model evaluations (scripts/eval_reference_models.py, scripts/eval_stock_export.py)
and the export tests, so each figure is computed one way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

from routescan.models.adapters import RoutingRecorder, get_adapter
from routescan.models.batching import pad_batch


@torch.inference_mode()
def lm_stats(
    model: torch.nn.Module, seqs: Sequence[Sequence[int]], prefix: int, pad: int, batch: int = 16
) -> tuple[float, list[torch.Tensor]]:
    """Perplexity over the tokens after ``prefix`` (a shared chat-template prefix is excluded), and
    each sequence's greedy predictions at those tokens."""
    nll, count, preds = 0.0, 0, []
    for start in range(0, len(seqs), batch):
        ids, att = pad_batch(seqs[start : start + batch], pad)
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        target = ids[:, 1:]
        mask = att[:, 1:].bool()
        mask[:, : max(prefix - 1, 0)] = False
        lp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        nll -= float(lp[mask].sum())
        count += int(mask.sum())
        top = logits[:, :-1].argmax(-1)
        preds.extend(top[i][mask[i]] for i in range(len(ids)))
    return math.exp(nll / count), preds


@torch.inference_mode()
def routing_and_logits(
    model: torch.nn.Module, seqs: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (token, MoE layer) top-k *sets* (sorted expert ids, ``[tokens, layers, k]``) and the
    logits (``[tokens, vocab]``), one unpadded sequence at a time (padding changes float sums)."""
    recorder = RoutingRecorder(get_adapter(model))
    handles = recorder.attach()
    sets, logits = [], []
    try:
        for seq in seqs:
            recorder.clear()
            logits.append(model(torch.tensor([list(seq)])).logits[0].float())
            sel = recorder.selections()
            sets.append(torch.stack([sel[layer].sort(dim=-1).values for layer in sorted(sel)], dim=1))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(sets), torch.cat(logits)


def topk_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of (token, layer) pairs whose top-k sets are equal."""
    return float((a == b).all(dim=-1).float().mean())


__all__ = ["lm_stats", "routing_and_logits", "topk_agreement"]

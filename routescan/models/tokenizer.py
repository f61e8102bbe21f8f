"""Prompt encoders: how a collector turns a request into the token ids the model's prefill sees.

The text never goes further than :meth:`PromptEncoder.encode`; callers keep only the ids for the
forward pass and the count for the trace.
"""

from __future__ import annotations

from typing import Any, Protocol


class PromptEncoder(Protocol):
    pad_id: int

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus BOS. Lets tiny models run offline with no vocabulary file."""

    PAD_ID = 256
    BOS_ID = 257
    EOS_ID = 258
    VOCAB_SIZE = 260
    pad_id = PAD_ID

    def encode(self, text: str) -> list[int]:
        return [self.BOS_ID, *text.encode("utf-8")]


class HFPromptEncoder:
    """A transformers tokenizer, through the model's chat template when it has one (as a served
    request would be), or as plain text otherwise."""

    def __init__(
        self, tokenizer: Any, *, chat_template: bool | None = None, system_prompt: str | None = None
    ):
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ValueError("--chat-template was asked for but the tokenizer has no chat template")
        self.chat_template = has_template if chat_template is None else chat_template
        self.system_prompt = system_prompt
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)

    def encode(self, text: str) -> list[int]:
        if self.chat_template:
            messages = [{"role": "user", "content": text}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(text, add_special_tokens=True)["input_ids"]]


WORDS: tuple[str, ...] = (
    *("<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"),
    *(f"w{i}" for i in range(100)),
    *("tell", "me", "about", "topic", "please", "hello", "bye", "request", "number"),
)


def save_word_tokenizer(path: Any) -> None:
    """A small word-level tokenizer with a chat template, saved beside a test model (no download):
    the tokenizer of the tiny stock checkpoints (routescan.models.stock) and of the test models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fast.save_pretrained(path)

"""How many tokens a model's own tokenizer makes of a caption before it cuts it to the context
length, for the ``text_truncated`` flag.

The one place that reads open_clip tokenizers' attributes (``encode``, ``clean_fn``,
``tokenizer_mode``, the wrapped Hugging Face ``tokenizer``); ``tests/test_tokens.py`` checks the
count against the token tensors open_clip itself produces, so it fails when they change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

# open_clip's BPE tokenizer wraps a caption in start- and end-of-text tokens.
_SIMPLE_SPECIAL_TOKENS = 2
# "clips" mode adds BOS, EOS and a class token around the caption's tokens.
_CLIPS_SPECIAL_TOKENS = 3


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` with the special tokens the tokenizer adds, before truncation."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer):
        return len(tokenizer.encode(text)) + _SIMPLE_SPECIAL_TOKENS
    if isinstance(tokenizer, HFTokenizer):
        cleaned = tokenizer.clean_fn(text)
        if tokenizer.tokenizer_mode == "clips":
            ids = tokenizer.tokenizer(cleaned, add_special_tokens=False)["input_ids"]
            return len(ids) + _CLIPS_SPECIAL_TOKENS
        return len(tokenizer.tokenizer(cleaned)["input_ids"])
    raise TypeError(f"no token count for open_clip tokenizer {type(tokenizer).__name__}")


class TextTokenizer:
    """A saved model's own tokenizer: captions -> token ids (cut to the context) and whether each
    was cut. The HTTP front end runs it, so the model worker only encodes."""

    def __init__(self, folder: Path) -> None:
        import open_clip

        self._tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        self.context_length = int(self._tokenizer.context_length)
        token_count(self._tokenizer, "")  # refuse a tokenizer whose truncation we cannot tell

    def is_truncated(self, text: str) -> bool:
        """True when the tokenizer makes more tokens of the caption (its special tokens included)
        than the context holds, so the end of the caption is not scored."""
        return token_count(self._tokenizer, text) > self.context_length

    def encoded_token_count(self, text: str) -> int:
        """Tokens of the caption that the model encodes: the tokenizer's count (its special tokens
        included), cut to the context as the ids are."""
        return min(token_count(self._tokenizer, text), self.context_length)

    def ids(self, texts: list[str]) -> torch.Tensor:
        """Token ids, one row of ``context_length`` per text."""
        return self._tokenizer(texts)

    def tokenize(self, text: str) -> tuple[np.ndarray, bool]:
        """One caption's token ids (1-D) and whether it was cut."""
        return self.ids([text])[0].numpy(), self.is_truncated(text)

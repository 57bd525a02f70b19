"""Captions -> a model's token ids, with the work a caption may cost bounded, and whether the
caption was cut to the context length (the ``text_truncated`` flag).

The one place that reads open_clip tokenizers' attributes (``SimpleTokenizer``'s ``pat``,
``clean_fn``, ``byte_encoder``, ``encoder``, ``bpe``, ``cache``; ``HFTokenizer``'s
``clean_fn``, ``tokenizer_mode`` and wrapped ``tokenizer``); ``tests/test_tokens.py`` checks the
ids against the ones open_clip itself produces, so it fails when they change.

open_clip's BPE costs time quadratic in a word's length (a word of 10,000 letters takes seconds)
and remembers every word it has seen. Here a caption is encoded word by word (each word's tokens
depend on that word alone) and only until the context is full, so the words after the cut cost
nothing and the ids are exactly open_clip's; a word longer than ``max_word_chars`` within the
context is refused, and the word cache is bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from cachetools import LRUCache

from clip_runtime.errors import TextTooLongError
from clip_runtime.settings import DEFAULT_MAX_TEXT_WORD_CHARS

# open_clip's BPE tokenizer wraps a caption in start- and end-of-text tokens.
_SIMPLE_SPECIAL_TOKENS = 2
# "clips" mode adds BOS, EOS and a class token around the caption's tokens.
_CLIPS_SPECIAL_TOKENS = 3
# Words whose BPE result is kept (open_clip keeps every word it ever saw, for good).
BPE_CACHE_WORDS = 10_000


class BoundedBpeCache:
    """What ``SimpleTokenizer.bpe`` reads and writes as ``self.cache`` (``in``, ``[]``, ``[]=``):
    its special tokens pinned (``bpe`` must find them to keep them whole), other words in an
    LRU of ``max_words``."""

    def __init__(self, pinned: dict[str, str], max_words: int) -> None:
        self._pinned = dict(pinned)
        self._words: LRUCache[str, str] = LRUCache(maxsize=max_words)

    def __contains__(self, word: object) -> bool:
        return word in self._pinned or word in self._words

    def __getitem__(self, word: str) -> str:
        if word in self._pinned:
            return self._pinned[word]
        return self._words[word]

    def __setitem__(self, word: str, value: str) -> None:
        if word not in self._pinned:
            self._words[word] = value

    def __len__(self) -> int:
        return len(self._pinned) + len(self._words)


def _simple_tokens(tokenizer: Any, text: str, keep: int, max_word_chars: int) -> list[int]:
    """open_clip's ``SimpleTokenizer.encode``, stopped once more than ``keep`` tokens are made
    (the words after that cannot change the first ``keep``); an over-long word met before that
    point is refused."""
    tokens: list[int] = []
    for match in tokenizer.pat.finditer(tokenizer.clean_fn(text)):
        word = match.group()
        if len(word) > max_word_chars:
            raise TextTooLongError(
                f"text has a word of {len(word)} characters; at most {max_word_chars} are "
                "accepted in one word (CLIP_MAX_TEXT_WORD_CHARS)"
            )
        encoded = "".join(tokenizer.byte_encoder[b] for b in word.encode("utf-8"))
        tokens.extend(tokenizer.encoder[piece] for piece in tokenizer.bpe(encoded).split(" "))
        if len(tokens) > keep:
            break
    return tokens


def token_count(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` with the special tokens the tokenizer adds, before truncation: the
    whole caption, at open_clip's own (unbounded) cost; the reference ``TextTokenizer`` is
    checked against."""
    from open_clip.tokenizer import SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer):
        return len(tokenizer.encode(text)) + _SIMPLE_SPECIAL_TOKENS
    return _hf_token_count(tokenizer, text)


def _hf_token_count(tokenizer: Any, text: str) -> int:
    cleaned = tokenizer.clean_fn(text)
    if tokenizer.tokenizer_mode == "clips":
        ids = tokenizer.tokenizer(cleaned, add_special_tokens=False)["input_ids"]
        return len(ids) + _CLIPS_SPECIAL_TOKENS
    return len(tokenizer.tokenizer(cleaned)["input_ids"])


class Tokenized(NamedTuple):
    """One caption, tokenized."""

    ids: np.ndarray  # ``context_length`` token ids, cut and padded as the model takes them
    truncated: bool  # the caption had more tokens than the context holds
    tokens: int  # the tokens the model encodes, its special tokens included


class TextTokenizer:
    """A saved model's own tokenizer: captions -> token ids (cut to the context) and whether each
    was cut. The model worker runs it, for captions missing from its text cache."""

    def __init__(self, folder: Path, max_word_chars: int = DEFAULT_MAX_TEXT_WORD_CHARS) -> None:
        import open_clip
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

        self._tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        self.context_length = int(self._tokenizer.context_length)
        self.max_word_chars = max_word_chars
        self._simple = isinstance(self._tokenizer, SimpleTokenizer)
        if self._simple:
            if self._tokenizer.reduction_fn is not None:
                raise TypeError("open_clip tokenizers with a reduction mask are not supported")
            self._tokenizer.cache = BoundedBpeCache(self._tokenizer.cache, BPE_CACHE_WORDS)
        elif not isinstance(self._tokenizer, HFTokenizer):
            raise TypeError(f"no token count for open_clip tokenizer {type(self._tokenizer)}")

    def tokenize(self, text: str) -> Tokenized:
        """One caption's token ids (1-D, ``context_length``), whether it was cut, and how many
        of its tokens the model encodes."""
        if not self._simple:
            ids = self._tokenizer([text])[0].numpy()
            count = _hf_token_count(self._tokenizer, text)
            return Tokenized(ids, count > self.context_length, min(count, self.context_length))
        room = self.context_length - _SIMPLE_SPECIAL_TOKENS
        tokens = _simple_tokens(self._tokenizer, text, room, self.max_word_chars)
        # As SimpleTokenizer.__call__ cuts: the first tokens, then end-of-text, zero padding.
        row = [self._tokenizer.sot_token_id, *tokens[:room], self._tokenizer.eot_token_id]
        ids = np.zeros(self.context_length, dtype=np.int64)
        ids[: len(row)] = row
        return Tokenized(ids, len(tokens) > room, len(row))

    def is_truncated(self, text: str) -> bool:
        """True when the tokenizer makes more tokens of the caption (its special tokens included)
        than the context holds, so the end of the caption is not scored."""
        return self.tokenize(text).truncated

    def encoded_token_count(self, text: str) -> int:
        """Tokens of the caption that the model encodes: the tokenizer's count (its special tokens
        included), cut to the context as the ids are; open_clip's at the bounded cost of
        ``tokenize``."""
        return self.tokenize(text).tokens

    def ids(self, texts: list[str]) -> torch.Tensor:
        """Token ids, one row of ``context_length`` per text."""
        return torch.from_numpy(np.stack([self.tokenize(text)[0] for text in texts]))

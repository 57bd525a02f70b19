"""Tokenizing: open_clip's exact ids and truncation flag, at a bounded cost per caption, with a
bounded word cache."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import open_clip
import pytest

from clip_runtime import ClipEngine, ClipSettings, Job, Preprocessing
from clip_runtime import tokens as tokens_module
from clip_runtime.errors import TextTooLongError, TooManyItemsError
from clip_runtime.fetch import FetchPolicy
from clip_runtime.tokens import TextTokenizer
from clip_service.inputs import JobBuilder
from clip_testkit.sample_images import jpeg_bytes

CAPTIONS = [
    "a photo of a cat",
    "A Photo of a CAT!!! &amp; a dog's   toy",
    "word " * 74 + "last",  # 75 words: the context exactly
    "word " * 75 + "over",  # one over
    "word " * 200,
    "二匹の猫がソファの上で寝ている 🐱🐱 " * 8,
    "<start_of_text> spelled out, and <end_of_text> too",
    "x" * 100 + " " + "y" * 100,  # long words, both within the limit
    "1234567890 " * 20,
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> TextTokenizer:
    return TextTokenizer(tiny_model_dir)


@pytest.mark.parametrize("caption", CAPTIONS)
def test_ids_and_truncation_are_open_clips_own(
    tokenizer: TextTokenizer, tiny_model_dir: Path, caption: str
) -> None:
    reference = open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}")
    ids, truncated, _ = tokenizer.tokenize(caption)
    assert np.array_equal(ids, reference([caption])[0].numpy())
    assert truncated == (len(reference.encode(caption)) + 2 > reference.context_length)
    assert np.array_equal(tokenizer.ids([caption, "a"])[0].numpy(), ids)


def test_words_after_the_context_are_never_tokenized(
    tokenizer: TextTokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A word's BPE costs time quadratic in its length; past the context it cannot change the
    ids, so it is not looked at, however long."""
    seen: list[int] = []
    original = tokenizer._tokenizer.bpe
    monkeypatch.setattr(
        tokenizer._tokenizer, "bpe", lambda word: (seen.append(len(word)), original(word))[1]
    )
    ids, truncated, _ = tokenizer.tokenize("a cat " * 40 + "z" * 9_000)
    assert truncated and max(seen) < 10
    assert np.array_equal(ids, tokenizer.tokenize("a cat " * 40)[0])


def test_a_long_word_within_the_context_is_refused(tokenizer: TextTokenizer) -> None:
    with pytest.raises(TextTooLongError, match=r"word of 101 characters.*CLIP_MAX_TEXT_WORD_"):
        tokenizer.tokenize("a photo of " + "q" * 101)
    with pytest.raises(TextTooLongError):  # punctuation runs are one BPE word too
        tokenizer.tokenize("!" * 5_000)
    assert tokenizer.tokenize("q" * 100)[0][1] > 0  # at the limit: tokenized


def test_the_word_cache_is_bounded_and_keeps_the_special_tokens(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens_module, "BPE_CACHE_WORDS", 50)
    small = TextTokenizer(tiny_model_dir)
    for i in range(300):
        small.tokenize(f"unique{chr(97 + i % 26)}{chr(97 + i // 26)}word")
    cache = small._tokenizer.cache
    assert len(cache) <= 50 + 2
    reference = open_clip.get_tokenizer(f"local-dir:{tiny_model_dir}")
    special = "<start_of_text> a <end_of_text>"
    assert np.array_equal(small.tokenize(special)[0], reference([special])[0].numpy())


def test_a_bad_caption_fails_its_job_alone_in_the_engine(tiny_model_dir: Path) -> None:
    engine = ClipEngine(ClipSettings(models=["ViT-B-32"]), {"ViT-B-32": tiny_model_dir})
    image = jpeg_bytes(0, 64, 64)
    good, bad = engine.run_jobs(
        [Job("ViT-B-32", image, "a cat"), Job("ViT-B-32", image, "a " + "m" * 500)]
    )[0]
    assert good.error is None and good.cosine is not None
    assert isinstance(bad.error, TextTooLongError)


def test_references_are_counted_before_any_is_looked_at(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The front end checks captions (the model worker tokenizes them): a request's references
    are counted before any is checked, and the checks run in the pool, not on the loop."""
    from clip_service import inputs

    settings = ClipSettings(models=["ViT-B-32"], max_references=4)
    preprocessing = Preprocessing(settings, {"ViT-B-32": tiny_model_dir})
    builder = JobBuilder(settings, preprocessing, FetchPolicy(False, (), 1, 1, 1, 1))
    checked: list[str] = []
    threads: set[str] = set()
    original = inputs.check_text

    def check_text(settings: ClipSettings, text: str) -> str:
        checked.append(text)
        threads.add(threading.current_thread().name)
        return original(settings, text)

    monkeypatch.setattr(inputs, "check_text", check_text)
    image = jpeg_bytes(0, 64, 64)
    with pytest.raises(TooManyItemsError, match=r"5 references; at most 4.*CLIP_MAX_REFERENCES"):
        asyncio.run(builder.pair("ViT-B-32", image, "a cat", ["ref"] * 5))
    assert checked == []
    pair = asyncio.run(builder.pair("ViT-B-32", image, "a cat", ["a", "b", "c", "d"]))
    assert len(pair.references) == 4
    asyncio.run(builder.text_jobs("ViT-B-32", ["one", "two"], "texts"))
    # Never on the event loop's thread: in the front end's pool.
    assert threads and all(name.startswith("clip-decode") for name in threads)
    preprocessing.close()

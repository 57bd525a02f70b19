"""Shared fixtures. Nothing downloads weights: models are random-init, saved by the project's own
code, and correctness is checked against open_clip computed on the same weights."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import pytest

from clip_testkit.server import model_folder, save_random_init_models

FIXTURES = Path(__file__).parent / "fixtures"
TINY = "clip-test-tiny"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny registered open_clip architecture, random-init, saved as a model entry."""
    import open_clip

    from clip_runtime.sources import save_random_init

    open_clip.add_model_config(FIXTURES / f"{TINY}.json")
    folder = tmp_path_factory.mktemp("tiny") / "entry"
    save_random_init(folder, TINY, seed=0)
    return folder


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's model store: random-init ViT-B-32, saved once by the project's own script
    (as a user runs it) for the unit tests and every server alike."""
    home = tmp_path_factory.mktemp("bentoml_home")
    save_random_init_models(home, ["ViT-B-32"])
    return home


@pytest.fixture(scope="session")
def b32_model_dir(bentoml_home: Path) -> Path:
    """Random-init ViT-B-32 (the real architecture and preprocessing): the store's entry."""
    return model_folder(bentoml_home, "clip-vit-b-32")


SIGLIP_TINY = "siglip-test-tiny"
# The words the offline stand-in tokenizer knows; anything else is <unk>.
TOKENIZER_WORDS = [
    "a",
    "photo",
    "of",
    "cat",
    "dog",
    "diagram",
    "bridge",
    "two",
    "dogs",
    "on",
    "beach",
    "at",
    "sunset",
    "the",
    "red",
    "green",
    "blue",
    "caption",
    "number",
    "word",
    "and",
    "in",
    "with",
]


def write_offline_tokenizer(folder: Path) -> Path:
    """A word-level Hugging Face tokenizer built here with ``tokenizers``, saved as files: an
    offline stand-in for SigLIP's SentencePiece tokenizer (on the hub, unreachable here) with the
    same interface open_clip uses (``AutoTokenizer`` on a folder, ``</s>`` appended, pad id 0).
    It tests the family's code path, not SigLIP's real vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *TOKENIZER_WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def siglip_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SigLIP-family architecture (logit bias, 64-token context, HF tokenizer), random-init,
    saved with the offline tokenizer copied into the entry."""
    import open_clip

    from clip_runtime.sources import save_random_init

    open_clip.add_model_config(FIXTURES / f"{SIGLIP_TINY}.json")
    root = tmp_path_factory.mktemp("siglip")
    tokenizer = write_offline_tokenizer(root / "tokenizer")
    save_random_init(root / "entry", SIGLIP_TINY, seed=0, tokenizer_dir=tokenizer)
    return root / "entry"

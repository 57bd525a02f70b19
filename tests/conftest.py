"""Shared fixtures. Nothing downloads weights: models are random-init, saved by the project's own
code, and correctness is checked against open_clip computed on the same weights."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
# The suite checks scores against open_clip's torch fp32 at tight bounds and starts many servers:
# torch unless a test asks for another runtime (tests/test_openvino_runtime.py does), so that no
# server converts its models to OpenVINO (tens of seconds) on CLIP_RUNTIME=auto.
os.environ.setdefault("CLIP_RUNTIME", "torch")

import pytest
from filelock import FileLock

from clip_runtime.registry import store_name
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


@contextmanager
def shared_by_the_run(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder of this test run, the same for every pytest-xdist worker (``make test`` runs
    two), held under a lock while the caller fills it, so that what it holds is made once."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is a child of the run's
        base = base.parent
    folder = base / name
    with FileLock(f"{folder}.lock"):
        yield folder


def save_once(tmp_path_factory: pytest.TempPathFactory, models: list[str]) -> Path:
    """The run's model store with random-init ``models`` added by the project's own script (as a
    user runs it), unless a worker already did."""
    with shared_by_the_run(tmp_path_factory, "bentoml_home") as home:
        missing = [m for m in models if not (home / "models" / store_name(m) / "latest").exists()]
        if missing:
            save_random_init_models(home, missing)
    return home


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run's model store: random-init ViT-B-32, saved once for the unit tests and every
    server alike."""
    return save_once(tmp_path_factory, ["ViT-B-32"])


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

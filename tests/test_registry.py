"""Any open_clip model: names derived from the spec, validation at save time, each family scored
the way it was trained (checked against open_clip on the same weights), truncation from the
model's own tokenizer, and tokenizers saved into the entry."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from bentoml._internal.tag import validate_tag_str

from clip_runtime import ClipEngine, ClipSettings, Job
from clip_runtime.errors import WeightsUnavailableError
from clip_runtime.image_inputs import ImageLimits
from clip_runtime.model import ClipModel
from clip_runtime.model_entry import WEIGHTS_FILE, read_entry
from clip_runtime.registry import api_suffix, parse_spec, store_name
from clip_runtime.runtimes import torch_plan
from clip_runtime.scoring import rank_probabilities
from clip_runtime.sources import save_pretrained, save_random_init
from clip_runtime.tokens import token_count
from clip_testkit.reference import reference_cosines
from clip_testkit.sample_images import jpeg_bytes

LIMITS = ImageLimits(10_000_000, 50_000_000, 4)
CAPTIONS = ["a photo of a cat", "a diagram of a bridge", "two dogs on a beach at sunset"]
ROOT = Path(__file__).resolve().parent.parent


def load(folder: Path) -> ClipModel:
    return ClipModel("test", folder, torch_plan(torch.device("cpu")), LIMITS, 16)


SPECS = [
    "ViT-B-32",
    "ViT-SO400M-14-SigLIP-384:webli",
    "EVA02-L-14:merged2b_s4b_b131k",
    "hf-hub:timm/ViT-B-16-SigLIP",
    "hf-hub:some-organisation/a-very-long-model-name-that-goes-past-bentoml-s-limit-of-63",
]


def test_names_are_derived_from_the_spec() -> None:
    assert store_name("ViT-B-32") == "clip-vit-b-32"  # the documented pair keeps its names
    assert store_name("ViT-L-14") == "clip-vit-l-14"
    assert api_suffix("ViT-B-32") == "clip_vit_b_32"
    assert store_name("ViT-SO400M-14-SigLIP-384:webli") == "clip-vit-so400m-14-siglip-384-webli"
    stores = [store_name(spec) for spec in SPECS]
    assert len(set(stores)) == len(SPECS)
    for name in stores:
        validate_tag_str(name)  # raises on a name BentoML would refuse
    for spec in SPECS:
        assert api_suffix(spec).isidentifier()


def test_specs_parse() -> None:
    assert parse_spec("ViT-B-32").tag == "laion2b_s34b_b79k"
    assert parse_spec("ViT-B-32", "openai").tag == "openai"
    assert parse_spec("ViT-B-32", "openai").name == "ViT-B-32"
    spec = parse_spec("EVA02-L-14:merged2b_s4b_b131k")
    assert (spec.architecture, spec.tag, spec.name) == (
        "EVA02-L-14",
        "merged2b_s4b_b131k",
        "EVA02-L-14:merged2b_s4b_b131k",
    )
    assert parse_spec("hf-hub:timm/ViT-B-16-SigLIP").is_hub
    with pytest.raises(WeightsUnavailableError, match="drop --pretrained"):
        parse_spec("ViT-B-32:openai", "laion2b_s34b_b79k")


def test_unknown_architecture_or_tag_fails_at_save_with_the_valid_names(tmp_path: Path) -> None:
    with pytest.raises(WeightsUnavailableError) as unknown:
        save_random_init(tmp_path / "a", "ViT-B-33", seed=0)
    assert (
        "ViT-B-32" in unknown.value.message and "ViT-SO400M-14-SigLIP-384" in unknown.value.message
    )
    with pytest.raises(WeightsUnavailableError) as bad_tag:
        save_pretrained(tmp_path / "b", "ViT-B-32", "laion9b")
    assert "laion2b_s34b_b79k" in bad_tag.value.message and "openai" in bad_tag.value.message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    # The same through the script, as a user runs it (both at once: each is mostly imports).
    home = tmp_path / "home"
    runs = {
        spec: subprocess.Popen(
            [sys.executable, "-m", "scripts.save_models", "--models", spec, *flags],
            cwd=ROOT,
            env={**os.environ, "BENTOML_HOME": str(home)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for spec, flags in (("ViT-B-33", ["--random-init"]), ("ViT-B-32:laion9b", ["--offline"]))
    }
    unknown_run, bad_tag_run = (run.communicate(timeout=300) for run in runs.values())
    assert [run.returncode for run in runs.values()] == [2, 2], unknown_run + bad_tag_run
    assert (
        "valid architectures: " in unknown_run[1] and "ViT-SO400M-14-SigLIP-384" in unknown_run[1]
    )
    assert "valid tags: " in bad_tag_run[1] and "laion2b_s34b_b79k" in bad_tag_run[1]
    assert not any((home / "models").glob("clip-*/*/"))  # nothing was saved


def test_unfetchable_tokenizer_fails_fast_before_any_weight(tmp_path: Path) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: the hub is unreachable here
    with pytest.raises(WeightsUnavailableError) as error:
        save_random_init(tmp_path / "entry", "ViT-B-16-SigLIP", seed=0)
    assert "timm/ViT-B-16-SigLIP" in error.value.message and "--tokenizer" in error.value.message
    assert not (tmp_path / "entry" / WEIGHTS_FILE).exists()


def test_siglip_entry_carries_its_tokenizer(siglip_model_dir: Path) -> None:
    entry = read_entry(siglip_model_dir)
    assert (entry.family, entry.tokenizer) == ("siglip", "timm/ViT-B-16-SigLIP")
    assert (siglip_model_dir / "tokenizer.json").is_file()
    model = load(siglip_model_dir)  # HF_HUB_OFFLINE=1: loads from the entry alone
    assert (model.info.family, model.info.context_length) == ("siglip", 64)
    assert model.info.logit_bias == pytest.approx(-10.0)
    assert model.info.embed_dim == 32


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "siglip_model_dir"])
def test_engine_matches_open_clip_per_family(
    model_dir: str, request: pytest.FixtureRequest
) -> None:
    """Cosines through the engine, and rank probabilities the family's way, against open_clip's
    own forward pass (its logit_scale and, for SigLIP, logit_bias) on the same weights."""
    folder = request.getfixturevalue(model_dir)
    images = [jpeg_bytes(seed) for seed in range(3)]
    engine = ClipEngine(ClipSettings(models=["m"], gpu_decode="off"), {"m": folder})
    outcomes, _ = engine.run_jobs(
        [Job("m", image, caption) for image, caption in zip(images, CAPTIONS, strict=True)]
    )
    ours = [outcome.cosine for outcome in outcomes if outcome.error is None]
    assert len(ours) == len(images)
    np.testing.assert_allclose(ours, reference_cosines(folder, images, CAPTIONS), atol=2e-6)

    model = engine.models["m"]
    reference, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS)
    with torch.no_grad():
        image = model.encode_images([model.preprocessor.from_bytes(images[0])])
        texts = reference.encode_text(tokens, normalize=True)
        logits = reference.logit_scale.exp() * image @ texts.T
        if model.family == "siglip":
            expected = torch.sigmoid(logits + reference.logit_bias)
        else:
            expected = logits.softmax(dim=-1)
    cosines = (image @ texts.T)[0].numpy()
    # The service's own computation: the family, logit_scale and logit_bias the worker reports.
    ours = rank_probabilities(cosines, model.family, model.logit_scale, model.logit_bias)
    np.testing.assert_allclose(ours, expected[0].numpy(), atol=1e-6)
    assert model.family == ("siglip" if model_dir == "siglip_model_dir" else "clip")


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "siglip_model_dir"])
def test_truncation_flag_follows_the_models_tokenizer(
    model_dir: str, request: pytest.FixtureRequest
) -> None:
    """The count equals the tokens open_clip writes, and the flag flips exactly where open_clip
    starts dropping words, for the BPE (77) and the Hugging Face (64) tokenizer alike."""
    model = load(request.getfixturevalue(model_dir))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{request.getfixturevalue(model_dir)}")
    context = model.info.context_length
    specials = token_count(tokenizer, "")
    fitting = " ".join(["cat"] * (context - specials))
    assert token_count(tokenizer, fitting) == int((tokenizer([fitting])[0] != 0).sum()) == context
    assert not model.is_truncated(fitting)
    longer = fitting + " dog"
    assert model.is_truncated(longer)
    assert torch.equal(tokenizer([longer])[0], tokenizer([fitting])[0])  # "dog" was dropped

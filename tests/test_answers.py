"""The answers' assembly (clip_service.answers), checked against hand computations without a
server: the scales, RefCLIPScore, rank probabilities, the model block, /batch counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clip_runtime import errors as E
from clip_runtime.jobs import Job, JobOutcome
from clip_runtime.model_entry import ModelEntry
from clip_service import answers
from clip_service.schemas import ModelStatus

RANDOM_INIT = ModelEntry(
    architecture="ViT-B-32",
    pretrained=None,
    weights="random-init",
    weights_sha256="0" * 64,
    preprocess_cfg={},
    preprocess_from=None,
    seed=0,
)
PRETRAINED = ModelEntry(
    architecture="ViT-B-32",
    pretrained="openai",
    weights="pretrained",
    weights_sha256="1" * 64,
    preprocess_cfg={},
    preprocess_from="openai",
)


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def status(family: str = "clip", logit_scale: float = 100.0, bias: float | None = None):
    return ModelStatus(
        name="ViT-B-32",
        architecture="ViT-B-32",
        pretrained="openai",
        weights="pretrained",
        untrained=False,
        device="cpu",
        dtype="float32",
        runtime="torch",
        ready=True,
        embed_dim=2,
        logit_scale=logit_scale,
        family=family,
        logit_bias=bias,
    )


@pytest.mark.parametrize(
    ("entry", "block"),
    [
        (RANDOM_INIT, {"model": "m", "pretrained": None, "weights": "random-init"}),
        (PRETRAINED, {"model": "m", "pretrained": "openai", "weights": "pretrained"}),
    ],
)
def test_every_result_names_the_model_its_tag_and_its_weights(
    entry: ModelEntry, block: dict[str, object]
) -> None:
    outcome = JobOutcome(cosine=0.3, text_vector=unit(1, 0), image_vector=unit(1, 1))
    results = [
        answers.single_result("m", entry, outcome, None, "torchmetrics"),
        answers.batch_result("m", entry, []),
        answers.rank_result("m", entry, status(), "texts", unit(1, 0), [unit(1, 0)]),
        answers.embeddings_result("m", entry, [unit(1, 0)]),
    ]
    for result in results:
        dumped = result.model_dump(mode="json")
        assert {key: dumped[key] for key in block} == block, type(result).__name__


def test_a_pair_scores_on_torchmetrics_scale_and_adds_clip_s_on_the_paper_scale() -> None:
    outcome = JobOutcome(cosine=0.3, text_truncated=True)
    plain = answers.single_result("m", PRETRAINED, outcome, None, "torchmetrics")
    assert plain.score == pytest.approx(30.0)
    assert plain.cosine == pytest.approx(0.3)
    assert plain.text_truncated is True
    assert "clip_s" not in plain.model_dump() and "ref_clip_score" not in plain.model_dump()
    paper = answers.single_result("m", PRETRAINED, outcome, None, "paper")
    assert paper.clip_s == pytest.approx(2.5 * 0.3)


def test_a_negative_cosine_scores_zero_on_both_scales_and_keeps_its_raw_cosine() -> None:
    item = answers.scored_item(4, JobOutcome(cosine=-0.2), None, "paper")
    assert (item.index, item.score, item.clip_s, item.cosine) == (4, 0.0, 0.0, -0.2)
    assert item.error is None


def test_ref_clip_score_is_the_harmonic_mean_of_clip_s_and_the_best_reference() -> None:
    caption = unit(1, 0)
    references = [
        JobOutcome(text_vector=unit(0.6, 0.8)),  # cos 0.6 with the caption: the best
        JobOutcome(text_vector=unit(-0.2, math.sqrt(1 - 0.04))),  # cos -0.2
    ]
    outcome = JobOutcome(cosine=0.3, text_vector=caption)
    clip_s, best = 2.5 * 0.3, 0.6
    expected = 2 * clip_s * best / (clip_s + best)  # 0.666...
    ref_score = answers.pair_ref_clip_score(outcome, references)
    assert ref_score == pytest.approx(expected, abs=1e-6)
    result = answers.single_result("m", PRETRAINED, outcome, ref_score, "torchmetrics")
    assert result.model_dump()["ref_clip_score"] == pytest.approx(expected, abs=1e-6)


def test_no_ref_clip_score_without_references_or_for_a_failed_pair() -> None:
    reference = JobOutcome(text_vector=unit(1, 0))
    assert answers.pair_ref_clip_score(JobOutcome(cosine=0.3, text_vector=unit(1, 0)), []) is None
    failed = JobOutcome(error=E.InvalidImageError("not an image"))
    assert answers.pair_ref_clip_score(failed, [reference]) is None


def test_clip_rank_probabilities_are_a_softmax_that_sums_to_one_and_follows_logit_scale() -> None:
    anchor = unit(1, 0)
    wanted = [0.3, 0.2, -0.1]
    candidates = [unit(c, math.sqrt(1 - c * c)) for c in wanted]
    sharp = answers.rank_result(
        "m", PRETRAINED, status(logit_scale=100.0), "texts", anchor, candidates
    )
    flat = answers.rank_result(
        "m", PRETRAINED, status(logit_scale=1.0), "texts", anchor, candidates
    )
    for result in (sharp, flat):
        assert sum(c.probability for c in result.results) == pytest.approx(1.0)
        assert [c.cosine for c in result.results] == pytest.approx(wanted, abs=1e-6)
        assert [c.score for c in result.results] == pytest.approx([30.0, 20.0, 0.0], abs=1e-4)
        assert result.best == 0 and result.ranked == "texts"
    # softmax(s * cos): the ratio of two candidates' probabilities is exp(s * their cosine gap)
    p = [c.probability for c in sharp.results]
    assert p[0] / p[1] == pytest.approx(math.exp(100.0 * 0.1), rel=1e-4)
    q = [c.probability for c in flat.results]
    assert q[0] / q[1] == pytest.approx(math.exp(1.0 * 0.1), rel=1e-4)
    assert sharp.logit_scale == 100.0 and flat.logit_scale == 1.0


def test_siglip_rank_probabilities_are_an_independent_sigmoid_with_the_bias() -> None:
    anchor = unit(1, 0)
    candidates = [unit(0.5, math.sqrt(0.75)), unit(0.1, math.sqrt(0.99))]
    result = answers.rank_result(
        "m", PRETRAINED, status("siglip", 10.0, -3.0), "images", anchor, candidates
    )
    expected = [1 / (1 + math.exp(-(10.0 * c - 3.0))) for c in (0.5, 0.1)]
    assert [c.probability for c in result.results] == pytest.approx(expected, rel=1e-5)
    assert result.ranked == "images"


def test_a_batch_counts_its_failures_and_a_failed_item_carries_its_code() -> None:
    failed = answers.failed_item(1, E.EmptyTextError("text is empty"))
    assert failed.model_dump() == {
        "index": 1,
        "score": None,
        "cosine": None,
        "text_truncated": False,
        "error": {"code": "empty_text", "message": "text is empty"},
    }
    scored = answers.scored_item(0, JobOutcome(cosine=0.25), None, "torchmetrics")
    batch = answers.batch_result("m", RANDOM_INIT, [scored, failed])
    assert (batch.succeeded, batch.failed) == (1, 1)
    assert [item.index for item in batch.results] == [0, 1]


def test_embeddings_take_each_jobs_own_tower_and_report_truncation_for_texts() -> None:
    image_job, text_job = Job(model="m", image=b"jpeg"), Job(model="m", text="a cat")
    both = JobOutcome(image_vector=unit(1, 0), text_vector=unit(0, 1))
    assert answers.embedding(image_job, both).tolist() == [1.0, 0.0]
    assert answers.embedding(text_job, both).tolist() == [0.0, 1.0]
    with pytest.raises(RuntimeError, match="no embedding"):
        answers.embedding(text_job, JobOutcome(image_vector=unit(1, 0)))
    vectors = [unit(3, 4), unit(1, 0)]
    images = answers.embeddings_result("m", PRETRAINED, vectors)
    assert images.dim == 2
    assert images.embeddings == [pytest.approx([0.6, 0.8]), [1.0, 0.0]]
    assert "text_truncated" not in images.model_dump()
    texts = answers.embeddings_result("m", PRETRAINED, vectors, [True, False])
    assert texts.model_dump()["text_truncated"] == [True, False]

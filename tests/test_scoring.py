"""The score definitions: torchmetrics' scale, Hessel et al.'s CLIP-S and RefCLIP-S, softmax."""

from __future__ import annotations

import numpy as np
import pytest

from clip_runtime.scoring import (
    clip_score,
    cosines,
    paper_clip_s,
    ref_clip_score,
    softmax_probabilities,
)


def test_clip_score_scales() -> None:
    assert clip_score(0.3) == pytest.approx(30.0)
    assert clip_score(-0.2) == 0.0
    assert paper_clip_s(0.3) == pytest.approx(0.75)
    assert paper_clip_s(-0.1) == 0.0


def test_ref_clip_score_is_the_harmonic_mean_of_the_paper() -> None:
    # CLIP-S = 2.5 * 0.3 = 0.75; best reference similarity 0.6; H-Mean = 2ab / (a + b).
    assert ref_clip_score(0.3, [0.2, 0.6, -0.1]) == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert ref_clip_score(-0.3, [0.9]) == 0.0  # clipped CLIP-S
    assert ref_clip_score(0.3, [-0.5]) == 0.0  # clipped reference similarity
    with pytest.raises(ValueError):
        ref_clip_score(0.3, [])


def test_softmax_probabilities_match_a_direct_softmax() -> None:
    values = np.array([0.31, 0.29, 0.1])
    probabilities = softmax_probabilities(values, logit_scale=100.0)
    direct = np.exp(100 * values) / np.exp(100 * values).sum()
    np.testing.assert_allclose(probabilities, direct)
    assert probabilities.sum() == pytest.approx(1.0)
    assert np.isfinite(softmax_probabilities(np.array([9.0, 9.5]), 1e4)).all()  # no overflow


def test_cosines_of_unit_vectors() -> None:
    query = np.array([1.0, 0.0], dtype=np.float32)
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(cosines(query, rows), [1.0, 0.0, -1.0])

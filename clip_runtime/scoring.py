"""Scores derived from cosines: the CLIP score scales, ranking probabilities, RefCLIPScore.

References: torchmetrics' CLIPScore (100 * max(cos, 0)); Hessel et al. 2021, "CLIPScore: A
Reference-free Evaluation Metric for Image Captioning": CLIP-S(c, v) = w * max(cos(c, v), 0) with
w = 2.5, and RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(c, r), 0)).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

PAPER_WEIGHT = 2.5  # Hessel et al.'s w: stretches CLIP-S over roughly [0, 1] for ViT-B/32


def clip_score(cosine: float) -> float:
    """torchmetrics' scale: 100 * max(cos, 0)."""
    return 100.0 * max(cosine, 0.0)


def paper_clip_s(cosine: float) -> float:
    """Hessel et al.'s CLIP-S: 2.5 * max(cos, 0)."""
    return PAPER_WEIGHT * max(cosine, 0.0)


def ref_clip_score(image_text_cosine: float, text_reference_cosines: Sequence[float]) -> float:
    """RefCLIP-S: harmonic mean of CLIP-S and the best clipped caption-reference cosine."""
    if not text_reference_cosines:
        raise ValueError("RefCLIPScore needs at least one reference")
    clip_s = paper_clip_s(image_text_cosine)
    reference_similarity = max(max(text_reference_cosines), 0.0)
    if clip_s + reference_similarity == 0.0:
        return 0.0
    return 2.0 * clip_s * reference_similarity / (clip_s + reference_similarity)


def cosines(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Cosines of one L2-normalized vector against rows of L2-normalized vectors."""
    return candidates.astype(np.float64) @ query.astype(np.float64)


def softmax_probabilities(values: np.ndarray, logit_scale: float) -> np.ndarray:
    """CLIP's zero-shot probabilities: softmax(logit_scale * cos), computed stably."""
    logits = logit_scale * values
    logits = logits - logits.max()
    weights = np.exp(logits)
    return weights / weights.sum()


def sigmoid_probabilities(values: np.ndarray, logit_scale: float, logit_bias: float) -> np.ndarray:
    """SigLIP's per-pair probabilities: sigmoid(logit_scale * cos + logit_bias), each in [0, 1]
    on its own (they need not sum to 1), computed stably."""
    logits = logit_scale * np.asarray(values, dtype=np.float64) + logit_bias
    return np.exp(-np.logaddexp(0.0, -logits))


def rank_probabilities(
    values: np.ndarray,
    family: Literal["clip", "siglip"],
    logit_scale: float,
    logit_bias: float | None = None,
) -> np.ndarray:
    """Candidates' probabilities the way the model's family was trained: softmax over the
    candidates for CLIP, an independent sigmoid per candidate for SigLIP."""
    if family == "siglip":
        if logit_bias is None:
            raise ValueError("SigLIP probabilities need the model's logit_bias")
        return sigmoid_probabilities(values, logit_scale, logit_bias)
    return softmax_probabilities(np.asarray(values, dtype=np.float64), logit_scale)

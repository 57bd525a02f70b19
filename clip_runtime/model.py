"""A loaded CLIP model: integrity-checked weights on a device, batched encoding, cosine scoring,
and an LRU cache of text embeddings."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cachetools import LRUCache

from clip_runtime.image_inputs import ImageLimits, ImagePreprocessor
from clip_runtime.jobs import JobOutcome
from clip_runtime.model_entry import (
    Family,
    ModelEntry,
    embed_dim,
    read_entry,
    verify_weights,
)
from clip_runtime.runtimes import Encoders, RuntimePlan, load_encoders
from clip_runtime.settings import DEFAULT_MAX_TEXT_WORD_CHARS
from clip_runtime.tokens import TextTokenizer, Tokenized

# A model-sized crop: HWC uint8 on the host (PIL path) or CHW uint8 on the device (tensor path).
Crop = np.ndarray | torch.Tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What callers are told about a served model."""

    name: str
    architecture: str
    pretrained: str | None
    weights: str
    weights_sha256: str
    device: str
    dtype: str
    runtime: str  # what runs the towers (clip_runtime.runtimes): torch or openvino
    embed_dim: int
    context_length: int
    image_size: tuple[int, int]
    # How rank probabilities are made (clip_runtime.scoring.rank_probabilities).
    family: Family = "clip"
    logit_bias: float | None = None  # SigLIP's learnt bias; None for CLIP


@dataclass
class BatchReport:
    """What one scoring call did, for metrics and traces (the engine records none itself)."""

    items: int = 0
    unique_texts: int = 0
    text_cache_hits: int = 0
    text_cache_misses: int = 0
    encode_image_s: float = 0.0
    encode_text_s: float = 0.0
    score_s: float = 0.0


@dataclass(frozen=True)
class TextEmbedding:
    vector: torch.Tensor  # L2-normalized, float32, on the model's device
    truncated: bool
    tokens: int  # the caption's tokens that the model encoded, its special tokens included


class ClipModel:
    """One model on one device. ``score`` and ``encode_*`` are not re-entrant per instance by
    design (one batch at a time is what keeps an accelerator busy); the cache is still locked so
    concurrent in-process callers stay correct."""

    def __init__(
        self,
        name: str,
        folder: Path,
        plan: RuntimePlan,
        limits: ImageLimits,
        text_cache_size: int,
        max_text_word_chars: int = DEFAULT_MAX_TEXT_WORD_CHARS,
    ) -> None:
        self.entry: ModelEntry = read_entry(folder)
        verify_weights(folder, self.entry)
        self.tokenizer = TextTokenizer(folder, max_text_word_chars)
        self.preprocessor = ImagePreprocessor(self.entry.preprocess_cfg, limits)
        self.encoders: Encoders = load_encoders(
            folder, self.entry, plan, self.preprocessor.size, self.tokenizer.context_length
        )
        self.device = plan.device
        self._text_cache: LRUCache[str, TextEmbedding] | None = (
            LRUCache(maxsize=text_cache_size) if text_cache_size > 0 else None
        )
        self._cache_lock = threading.Lock()
        context_length = self.tokenizer.context_length
        self.family: Family = self.encoders.family
        self.info = ModelInfo(
            name=name,
            architecture=self.entry.architecture,
            pretrained=self.entry.pretrained,
            weights=self.entry.weights,
            weights_sha256=self.entry.weights_sha256,
            device=str(plan.device),
            dtype=plan.precision,
            runtime=plan.runtime,
            embed_dim=embed_dim(folder),
            context_length=context_length,
            image_size=self.preprocessor.size,
            family=self.family,
            logit_bias=self.logit_bias,
        )
        if self.entry.untrained:
            logger.warning(
                "Model %s serves RANDOM-INIT weights (seed %s): scores are meaningless; "
                "for tests and demos only.",
                name,
                self.entry.seed,
            )

    # -- encoding -----------------------------------------------------------------------------

    def is_truncated(self, text: str) -> bool:
        """True when the caption is cut to the context length (``TextTokenizer``)."""
        return self.tokenizer.is_truncated(text)

    def _pixels(self, crops: Sequence[Crop]) -> torch.Tensor:
        """Crops as one uint8 NCHW batch on the device (4x less to copy than floats), then
        ToTensor's scaling and the tag's own Normalize, there, in float32."""
        host_rows = [i for i, crop in enumerate(crops) if isinstance(crop, np.ndarray)]
        batch = torch.empty((len(crops), 3, *self.preprocessor.size), dtype=torch.uint8)
        batch = batch.to(self.device)
        if host_rows:
            stacked = torch.from_numpy(np.stack([crops[i] for i in host_rows])).permute(0, 3, 1, 2)
            if self.device.type == "cuda":
                stacked = stacked.pin_memory()
            batch[host_rows] = stacked.to(self.device, non_blocking=True)
        for i, crop in enumerate(crops):
            if isinstance(crop, torch.Tensor):  # made on the device by the tensor decode path
                batch[i] = crop
        return self.preprocessor.to_pixels(batch)

    @torch.inference_mode()
    def encode_images(self, crops: Sequence[Crop]) -> torch.Tensor:
        """L2-normalized float32 image embeddings, one row per crop, on the model's device."""
        return self.encode_pixels(self._pixels(crops))

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings of a normalized NCHW float batch (the image tower alone)."""
        return F.normalize(self.encoders.encode_image(pixels), dim=-1)

    @torch.inference_mode()
    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoders.encode_text(tokens), dim=-1)

    def is_cached(self, text: str) -> bool:
        """Whether the text cache holds ``text`` now (it may be evicted before it is asked for;
        ``encode_texts`` then tokenizes it itself)."""
        if self._text_cache is None:
            return False
        with self._cache_lock:
            return text in self._text_cache

    def encode_texts(
        self,
        texts: list[str],
        report: BatchReport | None = None,
        tokenized: Mapping[str, Tokenized] | None = None,
    ) -> list[TextEmbedding]:
        """Embeddings of ``texts`` (duplicates encoded once; cached ones not at all), from
        ``tokenized`` ids where the caller tokenized them already."""
        report = report if report is not None else BatchReport()
        unique = list(dict.fromkeys(texts))
        found: dict[str, TextEmbedding] = {}
        if self._text_cache is not None:
            with self._cache_lock:
                for text in unique:
                    hit = self._text_cache.get(text)
                    if hit is not None:
                        found[text] = hit
        missing = [text for text in unique if text not in found]
        report.unique_texts += len(unique)
        report.text_cache_hits += len(found)
        report.text_cache_misses += len(missing)
        if missing:
            started = time.perf_counter()
            given = tokenized or {}
            encoded = [given.get(text) or self.tokenizer.tokenize(text) for text in missing]
            vectors = self._encode_tokens(torch.from_numpy(np.stack([e.ids for e in encoded])))
            for text, vector, tokens in zip(missing, vectors, encoded, strict=True):
                found[text] = TextEmbedding(vector, tokens.truncated, tokens.tokens)
            report.encode_text_s += time.perf_counter() - started
            if self._text_cache is not None:
                with self._cache_lock:
                    for text in missing:
                        self._text_cache[text] = found[text]
        return [found[text] for text in texts]

    # -- scoring ------------------------------------------------------------------------------

    def score_batch(
        self,
        crops: Sequence[Crop | None],
        texts: Sequence[str | None],
        keep_vectors: Sequence[bool],
        report: BatchReport | None = None,
        tokenized: Mapping[str, Tokenized] | None = None,
    ) -> list[JobOutcome]:
        """Mixed jobs in one pass per tower: a crop and a text give their cosine, either alone
        gives its embedding; ``keep_vectors`` returns the embeddings of pairs too. ``tokenized``:
        token ids of texts already tokenized by the caller."""
        report = report if report is not None else BatchReport()
        report.items += len(crops)
        image_rows = [i for i, crop in enumerate(crops) if crop is not None]
        text_rows = [i for i, text in enumerate(texts) if text is not None]
        image_vectors: dict[int, torch.Tensor] = {}
        if image_rows:
            started = time.perf_counter()
            encoded = self.encode_images([crop for crop in crops if crop is not None])
            image_vectors = dict(zip(image_rows, encoded, strict=True))
            report.encode_image_s += time.perf_counter() - started
        present_texts = [text for text in texts if text is not None]
        text_embeddings = dict(
            zip(text_rows, self.encode_texts(present_texts, report, tokenized), strict=True)
        )
        pairs = [i for i in image_rows if i in text_embeddings]
        cosines: dict[int, float] = {}
        if pairs:
            values = self._row_cosines(
                torch.stack([image_vectors[i] for i in pairs]),
                torch.stack([text_embeddings[i].vector for i in pairs]),
                report,
            )
            cosines = dict(zip(pairs, values, strict=True))

        def host(vector: torch.Tensor | None) -> np.ndarray | None:
            return None if vector is None else vector.cpu().numpy()

        outcomes = []
        for i in range(len(crops)):
            text = text_embeddings.get(i)
            keep = keep_vectors[i] or i not in cosines  # a lone tower's answer is its vector
            outcomes.append(
                JobOutcome(
                    cosine=cosines.get(i),
                    text_truncated=bool(text and text.truncated),
                    text_tokens=text.tokens if text else 0,
                    image_vector=host(image_vectors.get(i)) if keep else None,
                    text_vector=host(text.vector if text else None) if keep else None,
                )
            )
        return outcomes

    @staticmethod
    def _row_cosines(images: torch.Tensor, texts: torch.Tensor, report: BatchReport) -> list[float]:
        """Row-wise cosines of L2-normalized embeddings: the batch's one device sync."""
        started = time.perf_counter()
        values = (images * texts).sum(dim=-1).cpu().tolist()
        report.score_s += time.perf_counter() - started
        return values

    @property
    def logit_scale(self) -> float:
        """The temperature the model was trained with (for softmax probabilities)."""
        return self.encoders.logit_scale

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's learnt bias, added to ``logit_scale * cos`` before the sigmoid; None: CLIP."""
        return self.encoders.logit_bias

    def warm_up(self) -> None:
        """One forward pass of each tower, so the first request does not pay for lazy init."""
        height, width = self.preprocessor.size
        blank = np.full((height, width, 3), 127, dtype=np.uint8)
        self.encode_images([blank])
        self._encode_tokens(self.tokenizer.ids(["warm-up"]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

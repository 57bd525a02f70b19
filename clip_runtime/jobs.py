"""The one unit of model work and its one answer, from the HTTP front end through the model
worker to the engine (and for in-process callers: the CLI, the benchmark).

Both are plain dataclasses holding numpy arrays as they are: BentoML pickles them between its
services, and pydantic (which BentoML validates API arguments with) is told to accept the arrays
without a schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

import numpy as np
from pydantic import ConfigDict, WithJsonSchema

from clip_runtime.errors import ClipError
from clip_runtime.scoring import clip_score

# Arrays and errors travel pickled between the services; the schema only documents them.
Array = Annotated[np.ndarray, WithJsonSchema({"type": "array", "description": "numpy array"})]
JobError = Annotated[ClipError, WithJsonSchema({"type": "object", "description": "ClipError"})]

# An image on its way to a model: the model-sized crop (HWC uint8, open_clip's transform up to
# ToTensor), or encoded image bytes that the engine decodes itself.
ImageInput = Array | bytes


@dataclass
class Job:
    """An image and/or a text for one model. Both: a pair to score; one: an embedding.
    ``keep_vectors`` also returns a pair's embeddings (RefCLIPScore, rank)."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(arbitrary_types_allowed=True)

    model: str
    image: ImageInput | None = None
    text: str | None = None
    keep_vectors: bool = False
    # For the queue-wait metric and the batch span's links; the engine ignores them.
    sent_at: float = 0.0
    trace_context: str = ""


@dataclass(frozen=True)
class JobOutcome:
    """A job's answer: a pair's cosine and/or embeddings (L2-normalized float32), or the error
    that made this one job fail (the others in its batch are unaffected)."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(arbitrary_types_allowed=True)

    cosine: float | None = None
    text_truncated: bool = False
    text_tokens: int = 0  # the text's tokens the model encoded (OpenAI's usage counts them)
    image_vector: Array | None = None
    text_vector: Array | None = None
    error: JobError | None = None

    @property
    def score(self) -> float:
        """torchmetrics' CLIPScore scale: 100 * max(cos, 0)."""
        if self.cosine is None:
            raise ValueError("this outcome is not a scored pair")
        return clip_score(self.cosine)

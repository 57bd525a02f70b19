"""Every knob of the engine and the service, read once from the environment (prefix ``CLIP_``).

Each field's description is the documentation: docs/configuration.md is generated from it
(``python -m clip_runtime.settings``) so the two cannot drift apart.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from clip_runtime.registry import DEFAULT_MODELS

Precision = Literal["auto", "fp32", "fp16", "bf16"]
RuntimeName = Literal["auto", "torch", "openvino"]

# The longest side over the shortest that an image may have (``CLIP_MAX_IMAGE_ASPECT_RATIO``).
DEFAULT_MAX_IMAGE_ASPECT_RATIO = 50.0
# The longest word of a caption open_clip's BPE tokenizer is given (``CLIP_MAX_TEXT_WORD_CHARS``).
DEFAULT_MAX_TEXT_WORD_CHARS = 100
# The most reference captions one pair may carry (``CLIP_MAX_REFERENCES``).
DEFAULT_MAX_REFERENCES = 32
# The most scans a JPEG may have (``CLIP_MAX_JPEG_SCANS``).
DEFAULT_MAX_JPEG_SCANS = 100


def _cores() -> int:
    return os.cpu_count() or 1


class ClipSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIP_", extra="ignore")

    models: Annotated[list[str], NoDecode] = Field(
        default=list(DEFAULT_MODELS),
        description="Comma-separated models to serve, by the name they were saved as "
        "(`ViT-B-32`, `ARCH:TAG`, `hf-hub:ORG/NAME`); each must be saved in the model store.",
    )
    default_model: str = Field(
        default="ViT-B-32",
        description="Model used when a request names none (the first served one if unset and "
        "ViT-B-32 is not served).",
    )
    device: str = Field(
        default="auto",
        description="`auto` (cuda > mps > cpu), `cpu`, `cuda`, `cuda:N` or `mps`.",
    )
    precision: Precision = Field(
        default="auto",
        description="`auto`: fp16 on CUDA; bf16 with the OpenVINO runtime on a CPU with native "
        "bf16 (AMX or AVX512_BF16); fp32 otherwise. `fp32` forces exact scores; `fp16`; `bf16` "
        "(refused at start on a CPU without native bf16). See docs/runtime.md.",
    )
    runtime: RuntimeName = Field(
        default="auto",
        description="What runs the two towers: `torch`, or `openvino` (CPU only, several times "
        "faster there with bf16). `auto`: torch on CUDA/MPS, openvino on CPU when it is "
        "installed; `openvino` when it is not installed is refused at start.",
    )
    runtime_cache_dir: Path | None = Field(
        default=None,
        description="Where models converted for the OpenVINO runtime are kept (keyed by the "
        "weights' sha256 and the OpenVINO version; checked before use). Unset: "
        "`$BENTOML_HOME/clip-score-cache` when BENTOML_HOME is set, else `~/.cache/clip-score`.",
    )
    max_batch_size: int = Field(
        default=64, ge=1, description="Most image-text pairs in one model forward pass."
    )
    max_latency_ms: int = Field(
        default=10_000,
        ge=1,
        description="Adaptive batching latency budget per model (queue wait plus the predicted "
        "forward pass); work that cannot meet it gets 503 `overloaded` with `Retry-After`. 10 s "
        "keeps interactive scoring interactive and still fits a 32-pair ViT-B-32 fp32 batch on "
        "a 2-core CPU (docs/reliability.md); raise it for large batches on CPU.",
    )
    model_max_batch_size: Annotated[dict[str, int], NoDecode] = Field(
        default={},
        description="Per-model `CLIP_MAX_BATCH_SIZE`, comma-separated `NAME=N` "
        "(e.g. `ViT-B-32=256,ViT-L-14=64` on a GPU); unnamed models use the global value.",
    )
    model_max_latency_ms: Annotated[dict[str, int], NoDecode] = Field(
        default={},
        description="Per-model `CLIP_MAX_LATENCY_MS`, comma-separated `NAME=MS`.",
    )
    text_cache_size: int = Field(
        default=8192,
        ge=0,
        description="Text embeddings kept per model (LRU); 0 turns the cache off.",
    )
    decode_workers: int = Field(
        default_factory=_cores,
        ge=1,
        description="Threads decoding and preprocessing images (default: CPU count).",
    )
    gpu_decode: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Where JPEGs are decoded: `on`: the model worker (and in-process engine) "
        "decodes them in batches with torchvision (nvjpeg on CUDA) and resizes, crops and "
        "normalizes on the device, and the HTTP front end forwards JPEG bytes after its header "
        "checks; `off`: the front end decodes and crops every image with Pillow; `auto`: `on` "
        "when the model device is CUDA. Other formats are always cropped in the front end.",
    )
    decode_chunk_size: int = Field(
        default=128,
        ge=1,
        description="Images per device decode chunk: the next chunk decodes (on its own CUDA "
        "stream) while the previous one is encoded.",
    )
    http_workers: int = Field(
        default_factory=_cores,
        ge=1,
        description="The front end's HTTP worker processes (default: CPU count). Limits and "
        "queues marked 'per HTTP worker' multiply by this.",
    )
    max_request_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest request body accepted."
    )
    max_image_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1, description="Largest encoded image accepted."
    )
    max_image_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="Most pixels (width x height) in an image; checked before decoding.",
    )
    min_image_side: int = Field(
        default=4, ge=1, description="Smallest width or height accepted, in pixels."
    )
    max_image_aspect_ratio: float = Field(
        default=DEFAULT_MAX_IMAGE_ASPECT_RATIO,
        ge=1,
        description="Longest side over shortest side an image may have; checked before "
        "decoding. The model's resize scales the short side to its input side (224 or 336 px) "
        "and the long side with it, so this bounds the resized image (a 4x50000 PNG of a few "
        "hundred bytes would resize to 224x2800000); longer images get 422 "
        "`image_aspect_ratio_too_large`.",
    )
    max_jpeg_scans: int = Field(
        default=DEFAULT_MAX_JPEG_SCANS,
        ge=1,
        description="Most scans a JPEG may have, counted from its markers before decoding. "
        "Baseline JPEGs have one and libjpeg's progressive ones about ten; each scan is a pass "
        "over the whole image, so a small file of thousands of scans costs seconds of CPU. "
        "More get 422 `image_too_many_scans`.",
    )
    max_batch_items: int = Field(default=256, ge=1, description="Most items in one batch request.")
    max_candidates: int = Field(
        default=256, ge=1, description="Most candidates in one rank request."
    )
    max_references: int = Field(
        default=DEFAULT_MAX_REFERENCES,
        ge=1,
        description="Most reference captions (`references`, RefCLIPScore) per pair, checked "
        "before any is tokenized; more get 413 `too_many_items`.",
    )
    max_text_chars: int = Field(
        default=10_000, ge=1, description="Longest caption accepted, in characters."
    )
    max_text_word_chars: int = Field(
        default=DEFAULT_MAX_TEXT_WORD_CHARS,
        ge=1,
        description="Longest word (a run of letters, or of punctuation, as open_clip's BPE "
        "tokenizer splits a caption) within the part of a caption the model reads; its BPE "
        "costs time quadratic in the word's length. Longer words get 422 `text_too_long`; "
        "words after the context is full are never tokenized. CLIP models' own BPE only "
        "(Hugging Face tokenizers are not affected).",
    )

    # -- hostile-input hardening (issue 15) --
    decode_memory_budget_bytes: int = Field(
        default=768 * 1024 * 1024,
        ge=1,
        description="Memory that image decodes in flight may claim per HTTP worker, estimated "
        "from each header before decoding (encoded bytes + 9 to 12 bytes a pixel); URL bodies "
        "waiting for their decode may hold at most half of it. "
        "One image larger than the budget still decodes alone.",
    )
    decode_budget_wait_s: float = Field(
        default=2.0,
        ge=0,
        description="How long a decode waits for budget before its request gets 503 `overloaded`.",
    )
    auth_docs: Literal["open", "protected"] = Field(
        default="open",
        description="With API keys: `open` leaves the API documentation (`/`, `/docs.json`, "
        "`/schema.json`, `/evaluator/docs`, `/evaluator/demo`) readable without a key; "
        "`protected` requires the key there too.",
    )

    max_in_flight: int = Field(
        default=64,
        ge=1,
        description="Scoring requests handled at once per HTTP worker; more get 503 `overloaded` "
        "with `Retry-After` at once, before decoding.",
    )
    max_queued_pairs: int = Field(
        default=512,
        ge=1,
        description="Image-text pairs waiting for a model batch per HTTP worker; a request that "
        "would exceed it gets 503 `overloaded` with `Retry-After`.",
    )
    retry_after_s: int = Field(
        default=1, ge=0, description="`Retry-After` seconds sent with every 503."
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time a client has to send a request's headers, from the connection (or "
        "its first byte after a keep-alive pause); slower connections get 408 and are closed, "
        "so slow or idle clients cannot pin the HTTP workers.",
    )
    body_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="Time a client has to send a request's body after its headers, plus one "
        "second for every `CLIP_BODY_MIN_RATE_BYTES_S` bytes received; a slower body gets 408 "
        "and its connection is closed, so a client trickling a body cannot hold a request slot.",
    )
    body_min_rate_bytes_s: int = Field(
        default=16 * 1024,
        ge=1,
        description="The body rate (bytes a second) that keeps extending `CLIP_BODY_TIMEOUT_S`.",
    )
    shutdown_timeout_s: int = Field(
        default=60,
        ge=1,
        description="On SIGTERM, how long each worker lets accepted requests finish before "
        "cancelling them (the service's own bound, so `bentoml serve TAG`, the image and "
        "Kubernetes get it; `--timeout-graceful-shutdown` on the command line wins).",
    )

    allow_urls: bool = Field(
        default=True, description="Accept `http(s)://` image URLs, fetched server-side (SSRF-safe)."
    )
    url_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="Comma-separated hosts URLs may name (`.example.com` includes subdomains); "
        "a bare host admits ports 80 and 443 only, `host:port` (or `[v6]:port`) that port only; "
        "empty: any public host. Listed hosts may resolve to private addresses.",
    )
    url_connect_timeout_s: float = Field(default=3.0, gt=0, description="URL connect timeout.")
    url_read_timeout_s: float = Field(default=10.0, gt=0, description="URL read timeout.")
    url_total_timeout_s: float = Field(
        default=20.0, gt=0, description="Whole URL fetch deadline, redirects included."
    )
    url_max_redirects: int = Field(default=3, ge=0, description="Redirect hops followed.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default=[],
        repr=False,  # never in logs or tracebacks
        description="Comma-separated API keys, or the path of a file with one per line; when set, "
        "`Authorization: Bearer KEY` is required outside the open paths.",
    )
    auth_open_paths: Annotated[list[str], NoDecode] = Field(
        default=["/livez", "/readyz", "/metrics", "/evaluator/health", "/evaluator/metrics"],
        description="Comma-separated paths that stay open when API keys are set.",
    )

    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`text` (BentoML's format, with `trace=` while tracing) or `json`: one JSON "
        "object per line with `trace_id` and `span_id`.",
    )

    @field_validator("models", "url_allowed_hosts", "auth_open_paths", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("model_max_batch_size", "model_max_latency_ms", mode="before")
    @classmethod
    def _split_pairs(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [item.strip() for item in value.split(",") if item.strip()]
            if any("=" not in pair for pair in pairs):
                raise ValueError(f"expected NAME=N pairs, got {value!r}")
            return {name.strip(): n.strip() for name, n in (p.rsplit("=", 1) for p in pairs)}
        return value

    @field_validator("model_max_batch_size", "model_max_latency_ms")
    @classmethod
    def _positive(cls, value: dict[str, int]) -> dict[str, int]:
        if any(n < 1 for n in value.values()):
            raise ValueError(f"values must be >= 1: {value}")
        return value

    def batch_size_for(self, model: str) -> int:
        """The most jobs of ``model`` in one forward pass."""
        return self.model_max_batch_size.get(model, self.max_batch_size)

    def latency_ms_for(self, model: str) -> int:
        """``model``'s adaptive batching latency budget."""
        return self.model_max_latency_ms.get(model, self.max_latency_ms)

    @field_validator("url_allowed_hosts")
    @classmethod
    def _ports_are_numbers(cls, value: list[str]) -> list[str]:
        from clip_runtime.fetch import host_is_allow_listed

        host_is_allow_listed("", 0, tuple(value))  # raises ValueError for a bad port, at start
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _read_keys(cls, value: object) -> object:
        if isinstance(value, str):
            path = Path(value.strip())
            if value.strip() and "," not in value and path.is_file():
                return [line.strip() for line in path.read_text().splitlines() if line.strip()]
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @model_validator(mode="after")
    def _default_is_served(self) -> ClipSettings:
        if not self.models:
            raise ValueError("CLIP_MODELS names no model")
        if self.default_model not in self.models and "default_model" not in self.model_fields_set:
            self.default_model = self.models[0]
        if self.default_model not in self.models:
            raise ValueError(
                f"CLIP_DEFAULT_MODEL={self.default_model!r} is not among CLIP_MODELS={self.models}"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> ClipSettings:
    """The process-wide settings, read from the environment once."""
    return ClipSettings()


def settings_table() -> str:
    """The markdown table of settings, generated from the field descriptions."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, field in ClipSettings.model_fields.items():
        default = "CPU count" if field.default_factory else field.default
        if isinstance(default, list):
            default = ",".join(default)
        elif isinstance(default, dict):
            default = ",".join(f"{k}={v}" for k, v in default.items()) or "(none)"
        if name == "api_keys":
            default = "(none: auth off)"
        elif default is None:
            default = "(unset)"
        elif default == "":
            default = "(empty)"
        rows.append(f"| `CLIP_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows)


CONFIGURATION_HEADER = """\
# Configuration

<!-- Generated by `python -m clip_runtime.settings > docs/configuration.md` (make settings-table)
from the field descriptions in clip_runtime/settings.py; tests/test_settings.py fails when it is
stale. Edit the descriptions there, not this file. -->

Every setting is an environment variable with the prefix `CLIP_`, read once per process by one
pydantic-settings class (`clip_runtime/settings.py`). A value the class refuses stops the
service at start with the variable's name. Limits and queues marked "per HTTP worker" multiply by
`CLIP_HTTP_WORKERS`.

"""
CONFIGURATION_FOOTER = """
BentoML's own settings (`BENTOML_HOME` for the model store, `BENTOML_CONFIG`) apply as usual.
"""


def configuration_document() -> str:
    """docs/configuration.md: the settings table with what a reader needs around it."""
    return CONFIGURATION_HEADER + settings_table() + "\n" + CONFIGURATION_FOOTER


if __name__ == "__main__":
    print(configuration_document(), end="")

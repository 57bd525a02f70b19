"""The remote engine: the running service's batch endpoint through BentoML's generated client.

Up to ``concurrency`` batch requests are in flight; results come back in input order. Overload
answers (429, 503, and gateway 502/504) and dropped connections are retried (tenacity), never
sooner than the answer's ``Retry-After`` and otherwise with exponential backoff and jitter; a
batch the service finds too large (413) is split in halves. Any other refusal of a whole request
stops the run: it would fail every batch the same way. An API key goes as ``Authorization:
Bearer``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any

import httpx
import numpy as np
from bentoml.exceptions import BentoMLException
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.wait import wait_base

from clip_eval.cli_errors import ClipEvalError, ServiceItemError
from clip_eval.datasets import DatasetSpec
from clip_eval.image_cells import ImageLoader, LoaderConfig
from clip_eval.records import LoadedPair, Pair, PairOutcome
from clip_eval.wire import batch_item, encode_image
from clip_runtime.errors import ClipError

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})

# The Retry-After of the retryable answer the current task got last. BentoML's generated client
# raises exceptions without the response headers, so a response hook on its httpx client records
# the header here; each asyncio task (one batch request) has its own copy of the context.
_retry_after_s: ContextVar[float | None] = ContextVar("clip_eval_retry_after_s", default=None)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delay-seconds or an HTTP date (RFC 9110)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


async def record_retry_after(response: httpx.Response) -> None:
    """httpx response hook: remember what a retryable answer asks the client to wait."""
    if response.status_code in RETRY_STATUSES:
        _retry_after_s.set(parse_retry_after(response.headers.get("retry-after")))


class wait_retry_after(wait_base):
    """The answer's ``Retry-After`` when it sent one and it is longer than ``fallback``'s wait;
    else ``fallback`` (backoff with jitter, so retries of many clients spread out)."""

    def __init__(self, fallback: wait_base) -> None:
        self.fallback = fallback

    def __call__(self, retry_state: RetryCallState) -> float:
        backoff = self.fallback(retry_state)
        hinted = _retry_after_s.get()
        return backoff if hinted is None else max(hinted, backoff)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # the first try included
    initial_wait_s: float = 0.5
    max_wait_s: float = 30.0

    def retrying(self) -> AsyncRetrying:
        backoff = wait_exponential_jitter(initial=self.initial_wait_s, max=self.max_wait_s)
        return AsyncRetrying(
            stop=stop_after_attempt(self.attempts),
            wait=wait_retry_after(backoff),
            retry=retry_if_exception(is_retryable),
            before_sleep=_log_retry,
            reraise=True,
        )


def is_retryable(error: BaseException) -> bool:
    """Overload and transient network failures; never a request the service judged bad."""
    if isinstance(error, BentoMLException):
        return int(error.error_code) in RETRY_STATUSES
    return isinstance(error, httpx.TransportError)


def _log_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    logger.warning("retrying in %.1fs (attempt %d): %s", wait, state.attempt_number, _brief(error))


def _brief(error: BaseException | None) -> str:
    if isinstance(error, BentoMLException):
        code, message = error_envelope(error)
        return f"HTTP {int(error.error_code)} {code}: {message}"
    return f"{type(error).__name__}: {error}"


def error_envelope(error: BentoMLException) -> tuple[str, str]:
    """The service's ``{"error": {"code", "message", "request_id"}}`` from a failed call, when
    it sent one (the request id is what a 5xx asks to be quoted)."""
    try:
        body = json.loads(error.message)["error"]
        request_id = body.get("request_id")
        message = str(body["message"]) + (f" (request_id {request_id})" if request_id else "")
        return str(body["code"]), message
    except (ValueError, KeyError, TypeError, AttributeError):
        return HTTPStatus(int(error.error_code)).phrase.lower().replace(" ", "_"), error.message


@dataclass(frozen=True)
class RemoteConfig:
    url: str
    models: tuple[str, ...]
    loader: LoaderConfig
    batch_size: int = 32
    concurrency: int = 4
    timeout_s: float = 300.0
    ready_timeout_s: float = 60.0
    io_workers: int = 16
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    api_key: str | None = field(default=None, repr=False)
    keep_vectors: bool = False  # fetch the pairs' embeddings (--embeddings-out)


def generated_client(url: str, timeout_s: float, api_key: str | None) -> Any:
    """BentoML's generated async client, with the API key as its bearer token and the
    Retry-After hook on the httpx client it sends with (``.client``, a tested assumption)."""
    import bentoml

    # server_ready_timeout=0: readiness is checked by wait_ready, with backoff (the client's own
    # check polls /readyz in a tight loop). token="": without a key, BentoML would send
    # BENTO_CLOUD_API_KEY from the environment, a credential meant for BentoCloud.
    client = bentoml.AsyncHTTPClient(
        url, timeout=timeout_s, server_ready_timeout=0, token=api_key or ""
    )
    transport: httpx.AsyncClient = client.client
    transport.event_hooks["response"].append(record_retry_after)
    return client


async def open_client(
    url: str, timeout_s: float, ready_timeout_s: float, api_key: str | None = None
) -> Any:
    """BentoML's generated async client, once the service says it is ready."""
    await wait_ready(url, ready_timeout_s)
    try:
        client = generated_client(url, timeout_s, api_key)
        return await client.__aenter__()
    except (BentoMLException, httpx.HTTPError) as error:
        raise ClipEvalError(f"cannot use the service at {url}: {_brief(error)}") from error


HEALTH = "/evaluator/health"


async def wait_ready(url: str, timeout_s: float) -> None:
    """Poll ``/readyz`` until it answers 200 (models loaded and warmed up) or time runs out."""

    async def ready() -> None:
        response = await http.get(f"{url.rstrip('/')}/readyz")
        response.raise_for_status()

    async with httpx.AsyncClient(timeout=10) as http:
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(timeout_s),
                wait=wait_exponential_jitter(initial=0.2, max=5),
                retry=retry_if_exception(_not_ready_yet),
                reraise=True,
            ):
                with attempt:
                    await ready()
        except httpx.HTTPError as error:
            raise ClipEvalError(
                f"the service at {url} is not ready (waited up to {timeout_s:.0f}s): "
                f"{type(error).__name__}: {error}"
            ) from error


def _not_ready_yet(error: BaseException) -> bool:
    """Worth waiting for: no answer yet, or 503 while models load. A 404 means a wrong URL."""
    if isinstance(error, httpx.HTTPStatusError):
        return error.response.status_code >= 500
    return isinstance(error, httpx.TransportError)


# The generated client's endpoint method: evaluate_batch(items=[...], model=...) -> dict.
BatchCall = Callable[..., Awaitable[dict[str, Any]]]


class BatchRequester:
    """Per-item answers for one model, with retries. A batch the service finds too large (413)
    is split in halves; so is an embeddings request with a bad item (the embeddings endpoints
    fail a request whole), until the bad item stands alone and fails alone."""

    def __init__(
        self, call: BatchCall, retry: RetryPolicy, embed: dict[str, BatchCall] | None = None
    ) -> None:
        self.call = call
        self.retry = retry
        self.embed = embed or {}  # "images"/"texts" -> the embeddings endpoint's method

    async def _send(self, call: BatchCall, **arguments: Any) -> dict[str, Any]:
        """The answer, or the service's refusal (``BentoMLException``) of this request."""
        try:
            async for attempt in self.retry.retrying():
                with attempt:
                    _retry_after_s.set(None)  # only this attempt's answer counts
                    response = await call(**arguments)
        except BentoMLException as error:
            if int(error.error_code) == HTTPStatus.UNAUTHORIZED:
                raise ClipEvalError(
                    f"the service refused the API key ({_brief(error)}): pass the key with "
                    "--api-key or the CLIP_API_KEY environment variable"
                ) from error
            if is_retryable(error):
                raise ClipEvalError(
                    f"the service is still overloaded or unavailable after "
                    f"{self.retry.attempts} attempts ({_brief(error)}); rerun with --resume"
                ) from error
            raise
        except httpx.TransportError as error:
            raise ClipEvalError(
                f"cannot reach the service after {self.retry.attempts} attempts "
                f"({_brief(error)}); rerun with --resume"
            ) from error
        return response

    async def results(self, items: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
        try:
            response = await self._send(self.call, items=items, model=model)
        except BentoMLException as error:
            if int(error.error_code) != HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                raise ClipEvalError(f"the service refused a batch: {_brief(error)}") from error
            if len(items) > 1:  # over the service's item or byte limit: halve until it fits
                half = len(items) // 2
                return [
                    *await self.results(items[:half], model),
                    *await self.results(items[half:], model),
                ]
            code, message = error_envelope(error)
            return [{"error": {"code": code, "message": message}}]
        results = response["results"]
        if len(results) != len(items):
            raise ClipEvalError(f"the service answered {len(results)} results for {len(items)}")
        return results

    async def embeddings(
        self, field: str, values: list[str], model: str
    ) -> list[np.ndarray | ClipError]:
        """``field`` (``images`` or ``texts``) through its embeddings endpoint, one embedding or
        the service's error per value."""
        if not values:
            return []
        try:
            response = await self._send(self.embed[field], **{field: values}, model=model)
        except BentoMLException as error:
            if int(error.error_code) >= 500:
                raise ClipEvalError(f"the service failed embeddings: {_brief(error)}") from error
            if len(values) > 1:
                half = len(values) // 2
                return [
                    *await self.embeddings(field, values[:half], model),
                    *await self.embeddings(field, values[half:], model),
                ]
            return [ServiceItemError(*error_envelope(error))]
        vectors = response["embeddings"]
        if len(vectors) != len(values):
            raise ClipEvalError(f"the service answered {len(vectors)} embeddings for {len(values)}")
        return [np.asarray(vector, dtype=np.float32) for vector in vectors]


def outcome_of(
    model: str,
    result: dict[str, Any],
    vectors: dict[str, np.ndarray | ClipError | None],
    keep_vectors: bool = False,
) -> PairOutcome:
    """A row's outcome from its batch result and the embeddings fetched for it."""
    error = result.get("error")
    if error:
        return PairOutcome(model, error=error["code"], error_message=error["message"])
    for vector in vectors.values():
        if isinstance(vector, ClipError):
            return PairOutcome.failed(model, vector)
    ref_score = result.get("ref_clip_score")
    return PairOutcome.with_vectors(
        model,
        float(result["cosine"]),
        ref_clip_score=None if ref_score is None else float(ref_score),
        keep_vectors=keep_vectors,
        **{name: vector for name, vector in vectors.items() if not isinstance(vector, ClipError)},
    )


class RemoteEngine:
    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        self.models = config.models

    def untrained_models(self) -> list[str]:
        """From the service's health document (empty when it cannot be read: the run is done)."""
        headers = {"authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        try:
            response = httpx.get(
                f"{self.config.url.rstrip('/')}{HEALTH}", headers=headers, timeout=10
            )
            served = response.json()["models"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []
        return [m["name"] for m in served if m.get("untrained") and m["name"] in self.models]

    def score_dataset(
        self, dataset: DatasetSpec, skip: int
    ) -> Generator[list[PairOutcome], None, None]:
        """A synchronous generator driving an event loop: requests overlap one another (up to
        ``concurrency``) while results are handed out strictly in input order."""
        loop = asyncio.new_event_loop()
        io_pool = ThreadPoolExecutor(self.config.io_workers, thread_name_prefix="clip-eval-io")
        loader = ImageLoader(self.config.loader)
        pending: deque[asyncio.Task[list[PairOutcome]]] = deque()
        client = None
        try:
            client = loop.run_until_complete(
                open_client(
                    self.config.url,
                    self.config.timeout_s,
                    self.config.ready_timeout_s,
                    self.config.api_key,
                )
            )
            embed = {"images": client.embed_images, "texts": client.embed_texts}
            requester = BatchRequester(client.evaluate_batch, self.config.retry, embed)
            for pairs in dataset.iter_pairs(self.config.batch_size, skip):
                batch = self._score_batch(requester, loader, io_pool, pairs)
                pending.append(loop.create_task(batch))
                if len(pending) >= self.config.concurrency:
                    yield loop.run_until_complete(pending.popleft())
            while pending:
                yield loop.run_until_complete(pending.popleft())
        finally:
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            if client is not None:
                loop.run_until_complete(client.close())
            loop.close()
            io_pool.shutdown(wait=False, cancel_futures=True)
            loader.close()

    async def _score_batch(
        self,
        requester: BatchRequester,
        loader: ImageLoader,
        io_pool: ThreadPoolExecutor,
        pairs: Sequence[Pair],
    ) -> list[PairOutcome]:
        loop = asyncio.get_running_loop()
        # Files and URLs are read in threads: the event loop keeps the other requests moving.
        ready = await asyncio.gather(
            *(loop.run_in_executor(io_pool, loader.load_pair, pair) for pair in pairs)
        )
        good = [item for item in ready if not isinstance(item, ClipError)]
        items = [batch_item(item.image, item.caption, item.references) for item in good]
        per_model = (
            await asyncio.gather(*(requester.results(items, model) for model in self.models))
            if items
            else [[] for _ in self.models]
        )
        vectors = await asyncio.gather(
            *(
                self._vectors(requester, good, results, model)
                for model, results in zip(self.models, per_model, strict=True)
            )
        )
        answers = {
            model: iter(zip(results, model_vectors, strict=True))
            for model, results, model_vectors in zip(self.models, per_model, vectors, strict=True)
        }
        outcomes: list[PairOutcome] = []
        for item in ready:
            for model in self.models:
                if isinstance(item, ClipError):
                    outcomes.append(PairOutcome.failed(model, item))
                else:
                    result, item_vectors = next(answers[model])
                    outcomes.append(
                        outcome_of(model, result, item_vectors, self.config.keep_vectors)
                    )
        return outcomes

    async def _vectors(
        self,
        requester: BatchRequester,
        good: Sequence[LoadedPair],
        results: Sequence[dict[str, Any]],
        model: str,
    ) -> list[dict[str, np.ndarray | ClipError | None]]:
        """Per pair, the embeddings its row needs (its own when written out, its second image's
        and text's when compared), from the embeddings endpoints: only of the pairs the batch
        scored, images only when some are compared or written, texts likewise."""
        keep = self.config.keep_vectors
        images: list[tuple[int, str, bytes]] = []  # (pair, name, image)
        texts: list[tuple[int, str, str]] = []
        for index, item in enumerate(good):
            if results[index].get("error"):
                continue
            if keep or item.image_2 is not None:
                images.append((index, "image", item.image))
            if item.image_2 is not None:
                images.append((index, "image_2", item.image_2))
            if keep or item.text_2 is not None:
                texts.append((index, "caption", item.caption))
            if item.text_2 is not None:
                texts.append((index, "text_2", item.text_2))
        image_vectors, text_vectors = await asyncio.gather(
            requester.embeddings("images", [encode_image(v) for _, _, v in images], model),
            requester.embeddings("texts", [v for _, _, v in texts], model),
        )
        found: list[dict[str, np.ndarray | ClipError | None]] = [{} for _ in good]
        for (index, name, _), vector in [
            *zip(images, image_vectors, strict=True),
            *zip(texts, text_vectors, strict=True),
        ]:
            found[index][name] = vector
        return found

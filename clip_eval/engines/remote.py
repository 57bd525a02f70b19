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
import base64
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

from clip_eval.datasets import DatasetSpec
from clip_eval.errors import ClipEvalError
from clip_eval.images import ImageLoader, LoaderConfig
from clip_eval.records import Outcome, Pair
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
    """Per-item results of one batch for one model, with retries and 413 splitting."""

    def __init__(self, call: BatchCall, retry: RetryPolicy) -> None:
        self.call = call
        self.retry = retry

    async def results(self, items: list[dict[str, str]], model: str) -> list[dict[str, Any]]:
        try:
            async for attempt in self.retry.retrying():
                with attempt:
                    _retry_after_s.set(None)  # only this attempt's answer counts
                    response = await self.call(items=items, model=model)
        except BentoMLException as error:
            status = int(error.error_code)
            if status == HTTPStatus.UNAUTHORIZED:
                raise ClipEvalError(
                    f"the service refused the API key ({_brief(error)}): pass the key with "
                    "--api-key or the CLIP_API_KEY environment variable"
                ) from error
            if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                if len(items) > 1:  # over the service's item or byte limit: halve until it fits
                    half = len(items) // 2
                    return [
                        *await self.results(items[:half], model),
                        *await self.results(items[half:], model),
                    ]
                code, message = error_envelope(error)
                return [{"error": {"code": code, "message": message}}]
            if is_retryable(error):
                raise ClipEvalError(
                    f"the service is still overloaded or unavailable after "
                    f"{self.retry.attempts} attempts ({_brief(error)}); rerun with --resume"
                ) from error
            raise ClipEvalError(f"the service refused a batch: {_brief(error)}") from error
        except httpx.TransportError as error:
            raise ClipEvalError(
                f"cannot reach the service after {self.retry.attempts} attempts "
                f"({_brief(error)}); rerun with --resume"
            ) from error
        results = response["results"]
        if len(results) != len(items):
            raise ClipEvalError(f"the service answered {len(results)} results for {len(items)}")
        return results


def outcome_of(model: str, result: dict[str, Any]) -> Outcome:
    error = result.get("error")
    if error:
        return Outcome(model, error=error["code"], error_message=error["message"])
    return Outcome.scored(model, float(result["cosine"]), float(result["score"]))


class RemoteEngine:
    def __init__(self, config: RemoteConfig) -> None:
        self.config = config
        self.models = config.models

    def run(self, dataset: DatasetSpec, skip: int) -> Generator[list[Outcome], None, None]:
        """A synchronous generator driving an event loop: requests overlap one another (up to
        ``concurrency``) while results are handed out strictly in input order."""
        loop = asyncio.new_event_loop()
        io_pool = ThreadPoolExecutor(self.config.io_workers, thread_name_prefix="clip-eval-io")
        loader = ImageLoader(self.config.loader)
        pending: deque[asyncio.Task[list[Outcome]]] = deque()
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
            requester = BatchRequester(client.evaluate_batch, self.config.retry)
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
    ) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        # Files and URLs are read in threads: the event loop keeps the other requests moving.
        ready = await asyncio.gather(
            *(loop.run_in_executor(io_pool, loader.load_pair, pair) for pair in pairs)
        )
        items = [
            {"image": base64.b64encode(item[0]).decode("ascii"), "text": item[1]}
            for item in ready
            if not isinstance(item, ClipError)
        ]
        per_model = (
            await asyncio.gather(*(requester.results(items, model) for model in self.models))
            if items
            else [[] for _ in self.models]
        )
        answers = {
            model: iter(results) for model, results in zip(self.models, per_model, strict=True)
        }
        outcomes: list[Outcome] = []
        for item in ready:
            for model in self.models:
                if isinstance(item, ClipError):
                    outcomes.append(Outcome.failed(model, item))
                else:
                    outcomes.append(outcome_of(model, next(answers[model])))
        return outcomes

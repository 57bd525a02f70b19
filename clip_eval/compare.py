"""``--compare-modes``: the same pairs through the single endpoint (one request per pair) and the
batch endpoint, against a running service, timed; both modes get the same concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from bentoml.exceptions import BentoMLException

from clip_eval.cli_errors import UsageError
from clip_eval.datasets import DatasetSpec
from clip_eval.engines.remote import open_client
from clip_eval.image_cells import ImageLoader, LoaderConfig
from clip_eval.wire import batch_item
from clip_runtime.errors import ClipError


@dataclass(frozen=True)
class ModeTiming:
    mode: str
    requests: int
    pairs: int
    seconds: float
    failed: int

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class Comparison:
    model: str | None
    concurrency: int
    skipped: int  # pairs whose image could not be loaded, left out of both modes
    single: ModeTiming
    batch: ModeTiming
    max_score_difference: float | None  # between the modes, over pairs both scored

    @property
    def speedup(self) -> float:
        return self.single.seconds / self.batch.seconds if self.batch.seconds > 0 else float("inf")

    def format(self) -> str:
        difference = (
            "-" if self.max_score_difference is None else f"{self.max_score_difference:.2g}"
        )
        return "\n".join(
            [
                f"compare-modes: {self.single.pairs} pairs, model {self.model or '(default)'}, "
                f"concurrency {self.concurrency}"
                + (f", {self.skipped} pairs skipped (image not loadable)" if self.skipped else ""),
                f"  single: {self.single.requests} requests in {self.single.seconds:.2f} s "
                f"({self.single.pairs_per_s:.1f} pairs/s, {self.single.failed} failed)",
                f"  batch:  {self.batch.requests} requests in {self.batch.seconds:.2f} s "
                f"({self.batch.pairs_per_s:.1f} pairs/s, {self.batch.failed} failed)",
                f"  speedup: {self.speedup:.2f}x (batch over single); "
                f"max score difference {difference}",
            ]
        )


def compare_modes(
    url: str,
    dataset: DatasetSpec,
    loader: LoaderConfig,
    *,
    model: str | None,
    pairs: int = 64,
    batch_size: int = 32,
    concurrency: int = 4,
    timeout_s: float = 300.0,
    ready_timeout_s: float = 60.0,
    api_key: str | None = None,
) -> Comparison:
    items, skipped = _load_items(dataset, loader, pairs)
    if not items:
        raise UsageError(f"no loadable pair among the first {pairs} rows of {dataset.path}")
    return asyncio.run(
        _compare(
            url,
            items,
            skipped,
            model,
            batch_size,
            concurrency,
            timeout_s,
            ready_timeout_s,
            api_key,
        )
    )


def _load_items(
    dataset: DatasetSpec, config: LoaderConfig, limit: int
) -> tuple[list[dict[str, Any]], int]:
    loader = ImageLoader(config)
    items: list[dict[str, Any]] = []
    skipped = 0
    try:
        for pair in next(dataset.iter_pairs(limit), []):
            loaded = loader.load_pair(pair)
            if isinstance(loaded, ClipError):
                skipped += 1
            else:
                items.append(batch_item(loaded.image, loaded.caption))
    finally:
        loader.close()
    return items, skipped


async def _compare(
    url: str,
    items: list[dict[str, Any]],
    skipped: int,
    model: str | None,
    batch_size: int,
    concurrency: int,
    timeout_s: float,
    ready_timeout_s: float,
    api_key: str | None,
) -> Comparison:
    client = await open_client(url, timeout_s, ready_timeout_s, api_key)
    try:
        # One untimed call of each endpoint: neither mode pays for first-call setup.
        await client.evaluate_single(**items[0], model=model)
        await client.evaluate_batch(items=items[:1], model=model)

        limit = asyncio.Semaphore(concurrency)

        async def bounded(call: Callable[[], Awaitable[Any]]) -> Any:
            async with limit:
                try:
                    return await call()
                except BentoMLException as error:  # a pair the service refused
                    return error

        started = time.perf_counter()
        singles = await asyncio.gather(
            *(bounded(partial(client.evaluate_single, **item, model=model)) for item in items)
        )
        single_s = time.perf_counter() - started
        chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        started = time.perf_counter()
        batches = await asyncio.gather(
            *(bounded(partial(client.evaluate_batch, items=chunk, model=model)) for chunk in chunks)
        )
        batch_s = time.perf_counter() - started
    finally:
        await client.close()

    single_scores = [None if isinstance(r, BaseException) else r["score"] for r in singles]
    batch_scores: list[float | None] = []
    for chunk, answer in zip(chunks, batches, strict=True):
        if isinstance(answer, BaseException):
            batch_scores.extend([None] * len(chunk))
        else:
            batch_scores.extend(
                r["score"] if r.get("error") is None else None for r in answer["results"]
            )
    differences = [
        abs(a - b)
        for a, b in zip(single_scores, batch_scores, strict=True)
        if a is not None and b is not None
    ]
    return Comparison(
        model=model,
        concurrency=concurrency,
        skipped=skipped,
        single=ModeTiming("single", len(items), len(items), single_s, single_scores.count(None)),
        batch=ModeTiming("batch", len(chunks), len(items), batch_s, batch_scores.count(None)),
        max_score_difference=max(differences) if differences else None,
    )

"""Wire inputs -> engine jobs, in the HTTP front end: validate texts (the model worker tokenizes
them, with a bounded cost), fetch URLs, check images and decode and crop those the model worker
does not decode itself, in a thread pool (nothing client-sized runs on the event loop; counts are
checked before any item is looked at)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from clip_runtime import Job, Preprocessing, check_text
from clip_runtime import errors as E
from clip_runtime.errors import ClipError
from clip_runtime.fetch import FetchPolicy, fetch_image_bytes
from clip_runtime.image_inputs import decode_image_field, is_url
from clip_runtime.memory import Reservation
from clip_runtime.settings import ClipSettings
from clip_service.observability import stage

T = TypeVar("T")


@dataclass
class PreparedPair:
    """A pair to score and its reference captions (RefCLIPScore), all for one model batch."""

    job: Job
    references: list[Job]


def at_index(error: ClipError, field: str, index: int) -> ClipError:
    """The same error (same code), saying which element of a list was at fault."""
    located = copy.copy(error)
    located.message = f"{field}[{index}]: {error.message}"
    return located


class JobBuilder:
    def __init__(
        self, settings: ClipSettings, preprocessing: Preprocessing, fetch_policy: FetchPolicy
    ) -> None:
        self.settings = settings
        self.preprocessing = preprocessing
        self.fetch_policy = fetch_policy

    async def _in_pool(self, function: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.preprocessing.pool, function, *args)

    def _image_field(self, model: str, image: str) -> Job:
        return self._image_bytes(model, decode_image_field(image, self.settings.max_image_bytes))

    def _image_bytes(self, model: str, data: bytes, claim: Reservation | None = None) -> Job:
        return Job(model, image=self.preprocessing.image(model, data, claim))

    async def _url_job(self, model: str, url: str) -> Job:
        """Fetch, then crop; the body counts in the decode budget from its first byte until
        its crop is made: bodies of many URLs to large images otherwise add up uncounted."""
        claim = self.preprocessing.claim()

        async def count(body_bytes: int) -> None:
            if not claim.try_grow_body_to(body_bytes):  # the budget is spent: wait, off the loop
                await asyncio.to_thread(claim.grow_body_to, body_bytes)

        try:
            with stage(model, "fetch"):
                data = await fetch_image_bytes(url.strip(), self.fetch_policy, count)
            with stage(model, "decode"):
                return await self._in_pool(self._image_bytes, model, data, claim)
        finally:
            claim.release()

    async def image_job(self, model: str, image: str | bytes | None) -> Job:
        """An image-only job: URL fetch (async) or base64 decode, then header checks and (unless
        the model worker decodes it) the crop, in the pool."""
        if image is None:
            raise E.InvalidRequestError("image is missing")
        if isinstance(image, str) and is_url(image):
            return await self._url_job(model, image)
        with stage(model, "decode"):  # pool queueing included: it is part of the wait
            if isinstance(image, bytes):
                return await self._in_pool(self._image_bytes, model, image)
            return await self._in_pool(self._image_field, model, image)

    def _text_job(self, model: str, text: str | None, what: str = "text") -> Job:
        """Check one caption (the model worker tokenizes it, only on a text-cache miss)."""
        if text is None:
            raise E.InvalidRequestError(f"{what} is missing")
        return Job(model, text=check_text(self.settings, text))

    def _text_list(self, model: str, texts: list[str], field: str, what: str) -> list[Job]:
        jobs = []
        for index, text in enumerate(texts):
            try:
                jobs.append(self._text_job(model, text, what))
            except ClipError as error:
                raise at_index(error, field, index) from error
        return jobs

    def _pair_texts(
        self, model: str, text: str | None, references: list[str]
    ) -> tuple[Job, list[Job]]:
        caption = self._text_job(model, text)
        return caption, self._text_list(model, references, "references", "reference")

    async def text_job(self, model: str, text: str | None, what: str = "text") -> Job:
        return await self._in_pool(self._text_job, model, text, what)

    async def pair(
        self,
        model: str,
        image: str | bytes | None,
        text: str | None,
        references: list[str] | None = None,
    ) -> PreparedPair:
        """One pair (and its references), validated, its image cropped. The references are
        counted before any is looked at (a body within the size limit can hold a great many)."""
        if references is not None and not references:
            raise E.InvalidRequestError("references is empty")
        if references is not None and len(references) > self.settings.max_references:
            raise E.TooManyItemsError(
                f"{len(references)} references; at most {self.settings.max_references} per "
                "pair (CLIP_MAX_REFERENCES)"
            )
        caption, reference_jobs = await self._in_pool(
            self._pair_texts, model, text, references or []
        )
        job = await self.image_job(model, image)
        job.text, job.keep_vectors = caption.text, bool(reference_jobs)
        return PreparedPair(job, reference_jobs)

    async def image_jobs(self, model: str, images: list[str], field: str) -> list[Job]:
        """Image-only jobs; the first bad image fails the request, naming its index."""
        self.check_count(len(images), field)
        return await gathered_jobs([self.image_job(model, image) for image in images], field)

    async def text_jobs(self, model: str, texts: list[str], field: str) -> list[Job]:
        """Text-only jobs, counted first, then checked and tokenized in the pool; the first bad
        text fails the request, naming its index."""
        self.check_count(len(texts), field)
        return await self._in_pool(self._text_list, model, texts, field, "text")

    def check_count(self, count: int, field: str) -> None:
        if count > self.settings.max_batch_items:
            raise E.TooManyItemsError(
                f"{count} {field}; at most {self.settings.max_batch_items} per request"
            )
        if count == 0:
            raise E.InvalidRequestError(f"{field} is empty")


async def gathered_jobs(preparing: list[Coroutine[Any, Any, Job]], field: str) -> list[Job]:
    """The jobs ``preparing`` makes, all at once, in order; the first that fails fails the
    request, naming its index in ``field``."""
    prepared = await asyncio.gather(*preparing, return_exceptions=True)
    jobs = []
    for index, job in enumerate(prepared):
        if isinstance(job, ClipError):
            raise at_index(job, field, index)
        if isinstance(job, BaseException):
            raise job
        jobs.append(job)
    return jobs

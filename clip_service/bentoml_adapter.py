"""The one place that reaches into BentoML's private internals (pinned: bentoml==1.4.40).

Why: in BentoML 1.4.40 the client behind ``bentoml.depends(Scorer)``
(``_bentoml_impl.client.proxy2.SessionManager``) replaces its aiohttp session after every
``max_requests`` (100) calls or ``max_age`` (300 s) and *awaits ``close()`` on the old one while
other calls are still running on it*: those calls fail with ``ServerDisconnectedError``
(BentoML issue #5540; the proposed fix, PR #5698, is not merged). Under any concurrency above one,
a burst of model calls failed every 100 calls.

``install_dependency_session_fix()`` keeps BentoML's refresh policy but retires the old session
instead of closing it under its callers: it is closed once every call that could be using it
has ended — after the session's own total timeout, which bounds every request made on it (or
when the client itself is closed). ``call_with_reconnect`` retries an idempotent model call once
when the connection itself failed (a kept-alive connection the worker had just closed, a worker
restart): the second attempt gets a fresh connection.

``install_dependency_session_fix()`` also replaces the client's ``is_ready``: BentoML's catches
only ``ServerTimeoutError``, so a total timeout or a refused or dropped connection to a dead
worker escaped from the front end's ``/readyz`` handler before any answer was sent, and BentoML's
``TimeoutMiddleware`` then held the probe open until the traffic timeout (600 s here) instead
of answering 503. The replacement answers "not ready" for any connection failure or timeout.

``install_fast_worker_restart()``: BentoML starts its circus arbiter with ``check_delay=10``, the
period at which circus notices a dead worker and starts another one (circus has no SIGCHLD
handler), so a crashed model worker stayed dead for up to 10 s before its restart even began.
It sets that period to ``WORKER_CHECK_DELAY_S`` in the ``bentoml serve`` process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import aiohttp
import bentoml

logger = logging.getLogger("clip_service")

T = TypeVar("T")

# The BentoML release whose SessionManager this module was written against and tested with.
PATCHED_BENTOML_VERSION = "1.4.40"
# What the replacement methods use of BentoML's SessionManager.
REQUIRED_METHODS = ("get_session", "close", "_make_client", "_should_refresh")
REQUIRED_INIT_STATE = ("_session", "_created_at", "_request_count", "_timeout")
# What the replacement is_ready uses of BentoML's AsyncClient.
REQUIRED_CLIENT_STATE = ("_session_manager", "_readyz_endpoint")
_MARK = "_clip_retires_old_sessions"


class BentoMLChangedError(RuntimeError):
    """BentoML no longer looks like what the session fix was written for."""


def _session_manager_class() -> type[Any]:
    from _bentoml_impl.client import proxy2

    return cast(type[Any], proxy2.SessionManager)


def _async_client_class() -> type[Any]:
    from _bentoml_impl.client import proxy2

    return cast(type[Any], proxy2.AsyncClient)


def check_async_client(client_class: type[Any]) -> None:
    """Raise unless ``client_class`` has what the replacement ``is_ready`` uses."""
    if not callable(getattr(client_class, "is_ready", None)):
        raise BentoMLChangedError(f"{client_class.__qualname__} has no is_ready()")
    probe = client_class("http://127.0.0.1:1", server_ready_timeout=0)
    missing = [name for name in REQUIRED_CLIENT_STATE if not hasattr(probe, name)]
    temp_dir = getattr(probe, "_temp_dir", None)  # the client makes one at construction
    if temp_dir is not None:
        temp_dir.cleanup()
    if missing:
        raise BentoMLChangedError(
            f"{client_class.__qualname__} lacks {', '.join(missing)}: the readiness fix in "
            f"{__name__} no longer fits this BentoML"
        )


async def _is_ready(self: Any, timeout: int | None = None) -> bool:
    """BentoML's ``AsyncClient.is_ready``, False on any connection failure or timeout."""
    session = await self._session_manager.get_session()
    limit = aiohttp.ClientTimeout(total=timeout) if timeout else None
    try:
        async with session.get(self._readyz_endpoint, timeout=limit) as response:
            return response.status == 200
    except (TimeoutError, aiohttp.ClientError) as error:
        logger.info("model worker not ready: %r", error)
        return False


def check_session_manager(manager_class: type[Any], version: str) -> None:
    """Raise unless ``manager_class`` is the SessionManager this adapter was written for."""
    if version != PATCHED_BENTOML_VERSION:
        raise BentoMLChangedError(
            f"bentoml {version} is installed; the dependency session fix in {__name__} was "
            f"written for {PATCHED_BENTOML_VERSION}: check whether SessionManager still closes "
            "sessions under in-flight calls, then update or drop the fix"
        )
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(manager_class, m, None))]
    probe = manager_class(url="http://127.0.0.1:1", timeout=1.0, headers={})
    missing += [name for name in REQUIRED_INIT_STATE if not hasattr(probe, name)]
    if missing:
        raise BentoMLChangedError(
            f"{manager_class.__qualname__} lacks {', '.join(missing)}: the dependency session fix "
            f"in {__name__} no longer fits this BentoML"
        )


async def _get_session(self: Any) -> aiohttp.ClientSession:
    """BentoML's ``get_session`` with the old session retired instead of closed."""
    if self._session is None or self._should_refresh():
        if self._session is not None:
            _retire(self, self._session)
        self._session = self._make_client()
        self._created_at = time.monotonic()  # BentoML's own clock for max_age
        self._request_count = 0
    self._request_count += 1
    return cast(aiohttp.ClientSession, self._session)


def _retire(self: Any, session: aiohttp.ClientSession) -> None:
    """Close ``session`` once no call can still be using it: after its total timeout."""
    retired: set[aiohttp.ClientSession] = self.__dict__.setdefault("_clip_retired", set())
    closers: set[asyncio.Task[None]] = self.__dict__.setdefault("_clip_closers", set())
    retired.add(session)
    closer = asyncio.create_task(_close_when_unused(retired, session))
    closers.add(closer)
    closer.add_done_callback(closers.discard)


async def _close_when_unused(
    retired: set[aiohttp.ClientSession], session: aiohttp.ClientSession
) -> None:
    await asyncio.sleep(session.timeout.total or 0.0)
    if session in retired:
        retired.discard(session)
        await session.close()


async def _close(self: Any) -> None:
    """BentoML's ``close``, plus the retired sessions (the client is going away)."""
    for closer in self.__dict__.get("_clip_closers", set()).copy():
        closer.cancel()
    retired: set[aiohttp.ClientSession] = self.__dict__.get("_clip_retired", set())
    while retired:
        await retired.pop().close()
    if self._session is not None:
        await self._session.close()
        self._session = None


def apply_session_fix(manager_class: type[Any]) -> None:
    """Give ``manager_class`` (BentoML's SessionManager or a subclass) the retiring methods."""
    if manager_class.__dict__.get(_MARK, False):
        return
    check_session_manager(manager_class, bentoml.__version__)
    # BentoML's own methods, kept for the test that shows the failure they cause.
    manager_class._clip_unfixed_methods = {
        "get_session": manager_class.get_session,
        "close": manager_class.close,
    }
    manager_class.get_session = _get_session
    manager_class.close = _close
    setattr(manager_class, _MARK, True)


def apply_readiness_fix(client_class: type[Any]) -> None:
    """Give ``client_class`` (BentoML's AsyncClient or a subclass) the replacement is_ready."""
    if client_class.__dict__.get(_MARK, False):
        return
    check_async_client(client_class)
    client_class._clip_unfixed_methods = {"is_ready": client_class.is_ready}
    client_class.is_ready = _is_ready
    setattr(client_class, _MARK, True)


def install_dependency_session_fix() -> None:
    """Patch BentoML's dependency SessionManager and the client's is_ready (idempotent; raises
    if BentoML changed).

    Patching the class's methods covers clients created before and after this call, in every
    process that imports the service module (the Evaluator builds its Scorer client lazily, on
    the first ``self.scorer`` access, long after import).
    """
    apply_session_fix(_session_manager_class())
    apply_readiness_fix(_async_client_class())


async def call_with_reconnect(call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``, once more if the connection failed. Only for idempotent calls.

    Connection-level failures (``ServerDisconnectedError``, refused or reset connections) are
    retried; a timeout is not (the call already took the whole budget), nor is any answer.
    """
    try:
        return await call()
    except aiohttp.ServerTimeoutError:
        raise
    except aiohttp.ClientConnectionError as error:
        logger.info("model worker connection failed (%r); retrying once", error)
        return await call()


WORKER_CHECK_DELAY_S = 1.0
_FAST_RESTART_MARK = "_clip_fast_worker_restart"


def check_arbiter(arbiter_class: type[Any], controller_class: type[Any], version: str) -> None:
    """Raise unless BentoML's arbiter and circus's controller are what the patch expects."""
    if version != PATCHED_BENTOML_VERSION:
        raise BentoMLChangedError(
            f"bentoml {version} is installed; the worker restart patch in {__name__} was written "
            f"for {PATCHED_BENTOML_VERSION}"
        )
    if "check_delay" not in inspect.signature(controller_class.__init__).parameters:
        raise BentoMLChangedError(f"{controller_class.__qualname__} takes no check_delay")
    if not callable(arbiter_class.__dict__.get("start")):
        raise BentoMLChangedError(f"{arbiter_class.__qualname__} no longer defines start()")


def install_fast_worker_restart() -> None:
    """Make circus check its workers every ``WORKER_CHECK_DELAY_S`` (idempotent; raises if
    BentoML or circus changed). Takes effect in ``bentoml serve``, which imports the service
    before it starts the arbiter."""
    from bentoml._internal.utils import circus as bentoml_circus
    from circus.controller import Controller

    arbiter_class = bentoml_circus.Arbiter
    if arbiter_class.__dict__.get(_FAST_RESTART_MARK, False):
        return
    check_arbiter(arbiter_class, Controller, bentoml.__version__)
    bentoml_start = arbiter_class.start

    def start(self: Any, cb: Callable[[Any], Any] | None = None) -> None:
        # The controller keeps milliseconds and starts its periodic check in start().
        self.ctrl.check_delay = min(self.ctrl.check_delay, WORKER_CHECK_DELAY_S * 1000)
        bentoml_start(self, cb)

    arbiter_class.start = start
    setattr(arbiter_class, _FAST_RESTART_MARK, True)


def install_bentoml_fixes() -> None:
    """Both patches; call once at import of the service module (every process imports it)."""
    install_dependency_session_fix()
    install_fast_worker_restart()

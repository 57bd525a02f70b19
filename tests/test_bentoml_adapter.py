"""``clip_service.bentoml_adapter`` against the installed BentoML: every private name it relies
on still exists (an upgrade that moves one fails here, by name, instead of in a running
service), and its fixes of BentoML 1.4.40's dependency client do what they say.

The session bug (BentoML issue #5540): the dependency client's SessionManager closes its aiohttp
session every 100 calls while other calls are still running on it. Here against a local aiohttp
server with a slow endpoint, with BentoML's own methods and with the adapter's.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import reduce
from pathlib import Path
from typing import Any

import aiohttp
import bentoml
import httpx
import pytest
from _bentoml_impl.client import proxy2
from aiohttp import web
from starlette.requests import Request

from clip_service.bentoml_adapter import (
    BENTOML_CLIENT_AGENT,
    BENTOML_STOP_ATTRIBUTE,
    PATCHED_BENTOML_VERSION,
    PRIVATE_API,
    BentoMLChangedError,
    apply_readiness_fix,
    apply_session_fix,
    call_with_reconnect,
    check_arbiter,
    check_async_client,
    check_session_manager,
    install_cleanup_after_workers,
    install_dependency_session_fix,
    install_fast_worker_restart,
    install_plain_text_forms,
)


@pytest.mark.parametrize(("module", "path"), PRIVATE_API)
def test_private_api_still_exists(module: str, path: str) -> None:
    """A BentoML upgrade that moves a private name fails here, by name."""
    found = reduce(getattr, path.split("."), importlib.import_module(module))
    assert found is not None


async def _app(scope: object, receive: object, send: object) -> None:
    return None


@pytest.mark.parametrize(("given", "expected"), [(None, 7), (3, 3)])
def test_drain_bound_reaches_uvicorns_server(given: int | None, expected: int) -> None:
    """The bound lands on the uvicorn server whose SIGTERM handler is installed; a bound from
    the command line (``--timeout-graceful-shutdown``) is kept. Fails if uvicorn stops
    installing its bound ``handle_exit`` as the handler."""
    import uvicorn

    from clip_service.bentoml_adapter import bound_graceful_shutdown

    server = uvicorn.Server(uvicorn.Config(_app, timeout_graceful_shutdown=given))
    with server.capture_signals():
        assert bound_graceful_shutdown(7)
    assert server.config.timeout_graceful_shutdown == expected


def test_drain_bound_without_a_server_does_nothing() -> None:
    from clip_service.bentoml_adapter import bound_graceful_shutdown

    assert not bound_graceful_shutdown(7)


@pytest.mark.parametrize(
    ("device", "gpus", "resources"),
    [
        ("auto", 1, {"gpu": 1}),
        ("cuda", 2, {"gpu": 1}),
        ("auto", 0, {}),  # CPU host: no GPU declared, so BentoML neither warns nor pins
        ("cpu", 1, {}),
        ("cuda:1", 2, {}),  # the operator's index; CUDA_VISIBLE_DEVICES would renumber it
    ],
)
def test_model_worker_declares_a_gpu_only_where_it_serves_on_one(
    device: str, gpus: int, resources: dict[str, int]
) -> None:
    from clip_service.bentoml_adapter import accelerator_resources

    assert accelerator_resources(device, gpus) == resources


# -- the dependency client's sessions ------------------------------------------------------------

CALLS = 250  # BentoML refreshes after 100 calls: two refreshes with calls in flight
SLOW_S = 0.3


def _unfixed_class() -> type[Any]:
    """BentoML's SessionManager as shipped, whether or not this process installed the fix."""
    original = proxy2.SessionManager
    unfixed_methods = getattr(original, "_clip_unfixed_methods", {})
    return type("UnfixedSessionManager", (original,), unfixed_methods)


def _fixed_class() -> type[Any]:
    fixed = type("FixedSessionManager", (_unfixed_class(),), {})
    apply_session_fix(fixed)
    return fixed


@asynccontextmanager
async def slow_server() -> AsyncIterator[str]:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(SLOW_S)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def overlapping_calls(manager_class: type[Any], timeout_s: float = 30) -> list[str]:
    """``CALLS`` overlapping GETs through one manager, as the dependency client makes them."""
    async with slow_server() as url:
        manager = manager_class(url=url, timeout=timeout_s, headers={})

        async def call(index: int) -> str:
            await asyncio.sleep(index * 0.002)  # staggered: refreshes happen mid-flight
            session = await manager.get_session()
            try:
                async with session.get("/slow") as response:
                    return f"{response.status}"
            except (aiohttp.ClientError, asyncio.CancelledError) as error:
                # Calls still waiting for a connection of the closed session are cancelled.
                return type(error).__name__

        try:
            return await asyncio.gather(*(call(i) for i in range(CALLS)))
        finally:
            await manager.close()


def test_bentoml_session_manager_fails_calls_in_flight_at_a_refresh() -> None:
    """The reproduction: if this starts passing, BentoML fixed it and the adapter can go."""
    outcomes = asyncio.run(overlapping_calls(_unfixed_class()))
    failed = [o for o in outcomes if o != "200"]
    assert failed, "BentoML's SessionManager no longer breaks in-flight calls"
    assert set(failed) <= {"ServerDisconnectedError", "ClientConnectionError", "CancelledError"}


def test_fixed_session_manager_serves_every_overlapping_call() -> None:
    outcomes = asyncio.run(overlapping_calls(_fixed_class()))
    assert outcomes == ["200"] * CALLS


def test_a_retired_session_is_closed_after_its_timeout() -> None:
    async def scenario() -> tuple[bool, bool]:
        manager = _fixed_class()(url="http://127.0.0.1:1", timeout=0.3, headers={})
        manager.max_requests = 1
        first = await manager.get_session()
        await manager.get_session()
        second = await manager.get_session()  # the third call refreshes: `first` is retired
        retired_open = not first.closed and first is not second
        await asyncio.sleep(0.5)
        closed_after_grace = first.closed
        await manager.close()
        return retired_open, closed_after_grace

    assert asyncio.run(scenario()) == (True, True)


def test_install_patches_bentoml_once() -> None:
    install_dependency_session_fix()
    patched = proxy2.SessionManager.get_session
    install_dependency_session_fix()
    assert proxy2.SessionManager.get_session is patched
    assert patched is not proxy2.SessionManager._clip_unfixed_methods["get_session"]


def test_the_fix_refuses_another_bentoml_version() -> None:
    assert bentoml.__version__ == PATCHED_BENTOML_VERSION
    with pytest.raises(BentoMLChangedError, match=r"1\.4\.41"):
        check_session_manager(_unfixed_class(), "1.4.41")


@pytest.mark.parametrize("name", ["_should_refresh", "_make_client", "get_session"])
def test_the_fix_refuses_a_session_manager_without_what_it_uses(name: str) -> None:
    changed = type("ChangedSessionManager", (_unfixed_class(),), {name: None})
    with pytest.raises(BentoMLChangedError, match=name):
        check_session_manager(changed, PATCHED_BENTOML_VERSION)


def test_the_fix_refuses_a_session_manager_that_keeps_other_state() -> None:
    base = _unfixed_class()

    def init_without_request_count(self: Any, **kwargs: Any) -> None:
        base.__init__(self, **kwargs)
        del self._request_count

    renamed = type("Renamed", (base,), {"__init__": init_without_request_count})
    with pytest.raises(BentoMLChangedError, match="_request_count"):
        check_session_manager(renamed, PATCHED_BENTOML_VERSION)


def test_call_with_reconnect_retries_a_dropped_connection_once() -> None:
    attempts: list[int] = []

    async def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise aiohttp.ServerDisconnectedError()
        return "scored"

    assert asyncio.run(call_with_reconnect(flaky)) == "scored"
    assert len(attempts) == 2


@pytest.mark.parametrize(
    "error",
    [aiohttp.ServerDisconnectedError(), aiohttp.ServerTimeoutError("read timeout")],
    ids=["twice-disconnected", "timeout"],
)
def test_call_with_reconnect_gives_up_after_one_retry_and_never_retries_a_timeout(
    error: Exception,
) -> None:
    attempts: list[int] = []

    async def failing() -> str:
        attempts.append(1)
        raise error

    with pytest.raises(type(error)):
        asyncio.run(call_with_reconnect(failing))
    assert len(attempts) == (1 if isinstance(error, aiohttp.ServerTimeoutError) else 2)


# -- readiness of the model worker ---------------------------------------------------------------


def _client_class(fixed: bool) -> type[Any]:
    original = proxy2.AsyncClient
    unfixed = type(
        "UnfixedAsyncClient", (original,), getattr(original, "_clip_unfixed_methods", {})
    )
    if not fixed:
        return unfixed
    fixed_class = type("FixedAsyncClient", (unfixed,), {})
    apply_readiness_fix(fixed_class)
    return fixed_class


async def _readiness(client_class: type[Any], path: str) -> str:
    """``is_ready(1)`` of a client of ``client_class`` against ``path`` of a local server."""

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="\n")

    async def hangs(request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)  # past is_ready(1)
        return web.Response(text="\n")

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/hangs", hangs)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1] if path != "refused" else 1
    client = client_class(f"http://127.0.0.1:{port}", server_ready_timeout=0)
    client._readyz_endpoint = f"/{path}"
    try:
        return str(await client.is_ready(1))
    except Exception as error:  # what escapes to BentoML's /readyz handler
        return type(error).__name__
    finally:
        await client.close()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("path", "bentoml", "fixed"),
    [
        ("ready", "True", "True"),
        ("hangs", "TimeoutError", "False"),
        ("refused", "ClientConnectorError", "False"),
    ],
)
def test_is_ready_answers_false_where_bentoml_raises(path: str, bentoml: str, fixed: str) -> None:
    """BentoML's is_ready raises on a timeout or a refused connection, and its /readyz then
    never answers; the fixed one says False."""
    assert asyncio.run(_readiness(_client_class(fixed=False), path)) == bentoml
    assert asyncio.run(_readiness(_client_class(fixed=True), path)) == fixed


def test_the_readiness_fix_refuses_a_client_without_what_it_uses() -> None:
    base = _client_class(fixed=False)

    def init_without_readyz_endpoint(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        del self._readyz_endpoint

    renamed = type("Renamed", (base,), {"__init__": init_without_readyz_endpoint})
    with pytest.raises(BentoMLChangedError, match="_readyz_endpoint"):
        check_async_client(renamed)


# -- the worker restart period ----------------------------------------------------------------


def test_bentoml_checks_its_workers_only_every_10_s() -> None:
    """The premise of install_fast_worker_restart: BentoML's arbiter checks every 10 s."""
    from bentoml._internal.utils.circus import create_standalone_arbiter

    arbiter = create_standalone_arbiter([])
    try:
        assert arbiter.ctrl.check_delay == 10_000  # milliseconds
    finally:
        arbiter.ctrl.context.destroy(linger=0)


def test_fast_worker_restart_patches_the_arbiter_start_once() -> None:
    from bentoml._internal.utils import circus as bentoml_circus

    install_fast_worker_restart()
    patched = bentoml_circus.Arbiter.start
    install_fast_worker_restart()
    assert bentoml_circus.Arbiter.start is patched
    assert patched.__module__ == "clip_service.bentoml_adapter"


def test_fast_worker_restart_refuses_another_bentoml_or_circus() -> None:
    from bentoml._internal.utils.circus import Arbiter
    from circus.controller import Controller

    with pytest.raises(BentoMLChangedError, match=r"1\.5\.0"):
        check_arbiter(Arbiter, Controller, "1.5.0")

    class OtherController:
        def __init__(self, endpoint: str) -> None: ...

    with pytest.raises(BentoMLChangedError, match="check_delay"):
        check_arbiter(Arbiter, OtherController, PATCHED_BENTOML_VERSION)
    with pytest.raises(BentoMLChangedError, match="start"):
        check_arbiter(type("NoStart", (Arbiter,), {}), Controller, PATCHED_BENTOML_VERSION)


# -- the socket folder outlives the workers -----------------------------------------------------


@pytest.fixture
def arbiter_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, list[str]]]:
    """A BentoML arbiter whose exit stack deletes "the socket folder", with circus's stopping
    and socket closing replaced by records of when they ran."""
    from bentoml._internal.utils.circus import create_standalone_arbiter
    from circus.arbiter import Arbiter as CircusArbiter

    events: list[str] = []
    monkeypatch.setattr(CircusArbiter, "stop", lambda self: events.append("workers stopped"))
    monkeypatch.setattr(
        CircusArbiter,
        "stop_controller_and_close_sockets",
        lambda self: events.append("sockets closed"),
    )
    arbiter = create_standalone_arbiter([])
    arbiter.exit_stack.callback(events.append, "socket folder deleted")
    try:
        yield arbiter, events
    finally:
        arbiter.ctrl.context.destroy(linger=0)


def test_bentoml_deletes_the_socket_folder_before_stopping_its_workers(
    arbiter_events: tuple[Any, list[str]],
) -> None:
    """The premise of install_cleanup_after_workers, with BentoML's own ``Arbiter.stop``: the
    model worker's socket file is gone while the HTTP workers still drain."""
    from bentoml._internal.utils.circus import Arbiter

    arbiter, events = arbiter_events
    bentoml_stop = Arbiter.__dict__.get(BENTOML_STOP_ATTRIBUTE, Arbiter.stop)
    bentoml_stop(arbiter)
    assert events == ["socket folder deleted", "workers stopped"]


def test_the_socket_folder_is_deleted_after_the_workers_stopped(
    arbiter_events: tuple[Any, list[str]],
) -> None:
    from bentoml._internal.utils.circus import Arbiter

    install_cleanup_after_workers()
    install_cleanup_after_workers()  # idempotent: BentoML's stop stays the one kept
    assert Arbiter.__dict__[BENTOML_STOP_ATTRIBUTE].__module__ == "bentoml._internal.utils.circus"
    arbiter, events = arbiter_events
    arbiter.stop()
    assert events == ["workers stopped"]
    arbiter.stop_controller_and_close_sockets()  # circus: once every worker has exited
    assert events == ["workers stopped", "sockets closed", "socket folder deleted"]


# -- forms: text stays text ---------------------------------------------------------------------


@bentoml.service
class _Forms:
    @bentoml.api(route="/up")
    def up(
        self, image: Path, text: str, model: str | None = None, count: int = 0
    ) -> str:  # pragma: no cover - never called, only its input model is used
        return text


def _parse_form(
    files: list[tuple[str, Any]], original: bool = False, user_agent: str = "curl/8.5.0"
) -> Any:
    """Run BentoML's form deserialiser (patched, or its own with ``original``) on a form."""
    import tempfile

    from _bentoml_impl import serde
    from bentoml._internal.context import _request_var

    install_plain_text_forms()
    built = httpx.Request("POST", "http://x/up", files=files)
    body = built.read()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/up",
        "query_string": b"",
        "headers": [
            (b"content-type", built.headers["content-type"].encode()),
            (b"user-agent", user_agent.encode()),
        ],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    multipart = serde.ALL_SERDE["multipart/form-data"]
    parse = multipart._clip_unfixed_parse_request if original else multipart.parse_request
    spec = _Forms.apis["up"].input_spec

    async def in_request(temp_dir: str) -> Any:
        # BentoML stores uploads in the request's temporary folder (request_temp_dir)
        request = Request({**scope, "state": {"temp_dir": temp_dir}}, receive)
        _request_var.set(request)
        return await parse(multipart(), request, spec)

    with tempfile.TemporaryDirectory() as temp_dir:
        return asyncio.run(in_request(temp_dir))


IMAGE_PART = ("image", ("x.jpg", b"\xff\xd8", "image/jpeg"))


@pytest.mark.parametrize("caption", ["123", "true", "null", '"hi"', "[" * 100_000, "{}"])
def test_a_form_caption_is_plain_text(caption: str) -> None:
    parsed = _parse_form([IMAGE_PART, ("text", (None, caption)), ("model", (None, caption))])
    assert (parsed.text, parsed.model) == (caption, caption)


def test_bentoml_clients_json_parts_are_read_as_json() -> None:
    """BentoML's generated client sends every form part as JSON (`"a cat"` for the caption a
    cat) and says so in User-Agent: its uploads score the caption it was given."""
    from _bentoml_impl.client.http import HTTPClient

    client_source = Path(inspect.getsourcefile(HTTPClient) or "").read_text()
    assert f'"User-Agent": f"{BENTOML_CLIENT_AGENT}{{__version__}}"' in client_source
    assert "data[name] = json.dumps(value)" in client_source  # its form parts are JSON
    sent = [IMAGE_PART, ("text", (None, json.dumps("a cat"))), ("count", (None, "3"))]
    parsed = _parse_form(sent, user_agent=BENTOML_CLIENT_AGENT + bentoml.__version__)
    assert (parsed.text, parsed.count) == ("a cat", 3)
    assert _parse_form(sent).text == '"a cat"'  # from curl: the caption as written


def test_bentoml_parses_form_captions_as_json() -> None:
    """What the patch is for: BentoML's own deserialiser turns `"hi"` into `hi` and `123` into
    a number (fails when BentoML starts keeping form text as text: then drop the patch)."""
    parsed = _parse_form([IMAGE_PART, ("text", (None, '"hi"'))], original=True)
    assert parsed.text == "hi"
    with pytest.raises(Exception, match="valid string"):
        _parse_form([IMAGE_PART, ("text", (None, "123"))], original=True)
    with pytest.raises(RecursionError):
        _parse_form([IMAGE_PART, ("text", (None, "[" * 100_000))], original=True)


def test_non_string_form_fields_are_json_and_a_bad_one_is_a_400() -> None:
    from bentoml.exceptions import InvalidArgument

    parsed = _parse_form([IMAGE_PART, ("text", (None, "a")), ("count", (None, "3"))])
    assert parsed.count == 3
    for bad in ("[" * 100_000, "not json"):
        with pytest.raises(InvalidArgument, match="form field 'count' is not valid JSON"):
            _parse_form([IMAGE_PART, ("text", (None, "a")), ("count", (None, bad))])
    with pytest.raises(InvalidArgument, match="'text' is not UTF-8 text"):
        _parse_form([IMAGE_PART, ("text", ("t.bin", b"\xff\xfe", "application/octet-stream"))])


def test_a_text_value_for_a_file_field_is_never_downloaded() -> None:
    from bentoml.exceptions import InvalidArgument

    with pytest.raises(InvalidArgument, match="'image' must be a file upload"):
        _parse_form([("image", (None, "http://127.0.0.1:1/x.jpg")), ("text", (None, "a"))])

"""SSRF guard: addresses, allow-list, redirects re-checked per hop, byte cap, timeouts."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Iterator

import pytest

from clip_runtime import fetch
from clip_runtime.errors import (
    ImageTooLargeError,
    InvalidUrlError,
    UrlFetchFailedError,
    UrlNotAllowedError,
)
from clip_runtime.fetch import FetchPolicy, fetch_image_bytes, host_is_allow_listed
from clip_testkit.sample_images import jpeg_bytes
from tests.local_http import LocalServer, endless_body, local_server, slow_body

JPEG = jpeg_bytes(0, 32, 32)


def policy(*allowed: str, max_bytes: int = 1_000_000, enabled: bool = True) -> FetchPolicy:
    return FetchPolicy(
        enabled=enabled,
        allowed_hosts=allowed,
        max_bytes=max_bytes,
        connect_timeout_s=1,
        read_timeout_s=1,
        total_timeout_s=3,
    )


def get(url: str, fetch_policy: FetchPolicy) -> bytes:
    return asyncio.run(fetch_image_bytes(url, fetch_policy))


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with local_server() as running:
        running.routes["/cat.jpg"] = (200, {"Content-Type": "text/plain"}, JPEG)
        yield running


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",
        "2002:c0a8:101::1",
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not fetch.is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses(address: str) -> None:
    assert fetch.is_public_address(ipaddress.ip_address(address))


def test_allow_list_matching() -> None:
    assert host_is_allow_listed("img.example.com", 443, (".example.com",))
    assert host_is_allow_listed("example.com", 80, (".example.com",))
    assert not host_is_allow_listed("badexample.com", 443, (".example.com",))
    assert host_is_allow_listed("cdn.test", 443, ("CDN.test",))
    assert not host_is_allow_listed("a.cdn.test", 443, ("cdn.test",))


def test_allow_list_ports() -> None:
    """A bare host admits the default ports only; ``host:port`` that port only."""
    assert not host_is_allow_listed("cdn.test", 8080, ("cdn.test",))
    assert host_is_allow_listed("cdn.test", 8080, ("cdn.test:8080",))
    assert not host_is_allow_listed("cdn.test", 443, ("cdn.test:8080",))
    assert host_is_allow_listed("a.cdn.test", 8443, (".cdn.test:8443",))
    assert host_is_allow_listed("::1", 9000, ("[::1]:9000",))
    assert not host_is_allow_listed("::1", 9001, ("[::1]:9000",))
    with pytest.raises(ValueError, match="bad port"):
        host_is_allow_listed("cdn.test", 80, ("cdn.test:http",))


def test_loopback_is_refused_without_allow_list(server: LocalServer) -> None:
    for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]"):
        with pytest.raises(UrlNotAllowedError, match="not a public address") as refused:
            get(server.url("/cat.jpg", host), policy())
        assert str(refused.value) == f"host {host.strip('[]')!r} is not a public address"
    assert server.hosts_seen == []  # refused before any connection


def test_allow_listed_host_is_fetched_at_the_checked_address(server: LocalServer) -> None:
    assert get(server.url("/cat.jpg", "localhost"), policy(f"localhost:{server.port}")) == JPEG
    assert server.hosts_seen == [f"localhost:{server.port}"]  # Host kept, IP connected


def test_hosts_outside_the_allow_list_are_refused(server: LocalServer) -> None:
    with pytest.raises(UrlNotAllowedError, match="allow-list"):
        get(server.url("/cat.jpg"), policy("images.example.com"))
    with pytest.raises(UrlNotAllowedError, match="allow-list"):  # right host, other port
        get(server.url("/cat.jpg"), policy("127.0.0.1"))


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://x", "http://user:pw@x.org/"]
)
def test_other_schemes_and_credentials_are_refused(url: str) -> None:
    with pytest.raises(UrlNotAllowedError):
        get(url, policy())


MALFORMED_URLS = [
    "http://[x]/a.jpg",  # not an IPv6 literal
    "http://[::1/a.jpg",  # unclosed literal
    "http://example.com:99999/a.jpg",  # port out of range
    "http://example.com:-1/a.jpg",
    "http://example.com:port/a.jpg",
    "http://a..example.com/a.jpg",  # empty label (IDNA)
    "http://.example.com/a.jpg",
    "http://" + "a" * 300 + ".example.com/a.jpg",  # label over 63 characters
    "http://[" + "f" * 5000 + "]/a.jpg",
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_urls_that_do_not_parse_are_a_domain_error(url: str) -> None:
    with pytest.raises(InvalidUrlError, match="cannot be parsed") as raised:
        get(url, policy())
    assert len(raised.value.message) < 200  # the client's input is not echoed at length


def test_malformed_paths_and_redirects_are_a_domain_error(server: LocalServer) -> None:
    allowed = policy(f"127.0.0.1:{server.port}")
    with pytest.raises(InvalidUrlError):  # httpx.InvalidURL is no httpx.HTTPError
        get(server.url("/a\x01b.jpg"), allowed)
    server.routes["/to-bad-port"] = (302, {"Location": "http://127.0.0.1:99999/x"}, b"")
    with pytest.raises(InvalidUrlError):
        get(server.url("/to-bad-port"), allowed)


def test_unicode_hosts_are_sent_in_idna(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def loopback(host: str, port: int) -> list[fetch.IPAddress]:
        assert host == "xn--bcher-kva.example"  # never the raw Unicode name
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(fetch, "_resolve", loopback)
    monkeypatch.setattr(fetch, "is_public_address", lambda a: True)
    assert get(f"http://b\u00fccher.example:{server.port}/cat.jpg", policy()) == JPEG
    assert server.hosts_seen[-1] == f"xn--bcher-kva.example:{server.port}"


def test_switched_off() -> None:
    with pytest.raises(UrlNotAllowedError, match="switched off"):
        get("https://example.com/a.jpg", policy(enabled=False))


def test_redirect_chain_ending_at_a_private_address_is_refused(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-ins: 127.0.0.1 plays a public host, 127.0.0.2 (also this machine) a private one.
    monkeypatch.setattr(fetch, "is_public_address", lambda a: str(a) == "127.0.0.1")
    server.routes["/hop1"] = (302, {"Location": "/hop2"}, b"")
    server.routes["/hop2"] = (307, {"Location": server.url("/cat.jpg", "127.0.0.2")}, b"")
    with pytest.raises(UrlNotAllowedError, match=r"'127\.0\.0\.2' is not a public"):
        get(server.url("/hop1"), policy())
    assert len(server.hosts_seen) == 2  # the private hop was never connected to
    server.routes["/ok"] = (301, {"Location": "/cat.jpg"}, b"")
    assert get(server.url("/ok"), policy()) == JPEG


def test_too_many_redirects(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch, "is_public_address", lambda a: True)
    for i in range(5):
        server.routes[f"/r{i}"] = (302, {"Location": f"/r{i + 1}"}, b"")
    server.routes["/r5"] = (200, {}, JPEG)
    with pytest.raises(UrlFetchFailedError, match="redirects"):
        get(server.url("/r0"), policy())
    assert get(server.url("/r2"), policy()) == JPEG  # exactly 3 hops are fine


def test_byte_cap_while_streaming(server: LocalServer) -> None:
    server.routes["/endless"] = endless_body
    server.routes["/declared"] = (200, {"Content-Length": "999999999"}, b"")
    allowed = policy(f"127.0.0.1:{server.port}", max_bytes=200_000)
    with pytest.raises(ImageTooLargeError):
        get(server.url("/endless"), allowed)
    with pytest.raises(ImageTooLargeError):
        get(server.url("/declared"), allowed)


def test_timeouts_and_http_errors(server: LocalServer) -> None:
    server.routes["/slow"] = slow_body
    allowed = policy(f"127.0.0.1:{server.port}")
    with pytest.raises(UrlFetchFailedError):
        get(server.url("/slow"), allowed)
    with pytest.raises(UrlFetchFailedError, match="404"):
        get(server.url("/missing"), allowed)
    with pytest.raises(UrlFetchFailedError, match="resolve"):
        get("http://no-such-host.invalid/x.jpg", policy())


def test_body_progress_is_reported_as_it_streams(server: LocalServer) -> None:
    """The service counts fetched bodies in its decode budget through this callback: the
    declared length first (claimed whole before the first byte), then the length so far."""
    big = jpeg_bytes(1, 600, 400)
    server.routes["/big.jpg"] = (200, {"Content-Type": "image/jpeg"}, big)
    seen: list[int] = []

    async def count(received: int) -> None:
        seen.append(received)

    body = asyncio.run(
        fetch_image_bytes(server.url("/big.jpg"), policy(f"127.0.0.1:{server.port}"), count)
    )
    assert body == big
    assert seen[0] == len(big)  # the server sent Content-Length
    streamed = seen[1:]
    assert len(streamed) > 1 and streamed == sorted(streamed) and streamed[-1] == len(big)


def test_fetches_share_one_tls_context(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client left to itself builds a TLS context per fetch (the whole CA bundle, ~300 KB of
    OpenSSL heap each, kept by httpx's reference cycles: 380 MB after 1,280 fetches)."""
    fetch.tls_context()  # the process's one context, built before counting
    built: list[object] = []
    original_new = ssl.SSLContext.__new__

    def counting_new(cls: type[ssl.SSLContext], *args: object, **kwargs: object) -> object:
        built.append(cls)
        return original_new(cls, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "__new__", counting_new)
    allowed = policy(f"127.0.0.1:{server.port}")

    async def fetch_many() -> list[bytes]:
        return [await fetch_image_bytes(server.url("/cat.jpg"), allowed) for _ in range(8)]

    assert asyncio.run(fetch_many()) == [JPEG] * 8
    assert built == []
    assert fetch.tls_context().verify_mode == ssl.CERT_REQUIRED

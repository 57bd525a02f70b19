"""Fetch an image by URL without becoming a door into the network the service runs in.

Every hop (the URL and each redirect, at most ``max_redirects``) is resolved here, every address
is checked, and the connection goes to the checked address itself (the ``Host`` header and TLS
SNI/certificate check keep the real name), so DNS cannot change the answer between check and
connect. Bodies are read as a stream and cut at the byte cap; what arrives is judged by decoding,
never by its Content-Type.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from clip_runtime.errors import (
    ImageTooLargeError,
    InvalidUrlError,
    UrlFetchFailedError,
    UrlNotAllowedError,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = {301, 302, 303, 307, 308}
# How much of a parser's complaint an error message repeats (it may quote the client's input).
_REASON_CHARS = 120


@dataclass(frozen=True)
class FetchPolicy:
    enabled: bool
    allowed_hosts: tuple[str, ...]  # empty: any public host; else only these (and subdomains of .x)
    max_bytes: int
    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    max_redirects: int = 3


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public_address(address: IPAddress) -> bool:
    """False for loopback, private, link-local (cloud metadata 169.254.169.254 included), shared,
    multicast, reserved, unspecified, and IPv6 forms that embed any of those."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
    return address.is_global and not address.is_multicast and not address.is_reserved


DEFAULT_PORTS = (80, 443)


def _split_port(entry: str) -> tuple[str, tuple[int, ...]]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` -> (host, admitted ports)."""
    entry = entry.strip().lower()
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:
        host, port = entry, ""
    if port and not port.isdigit():
        raise ValueError(f"allow-list entry {entry!r} has a bad port")
    return host.rstrip("."), (int(port),) if port else DEFAULT_PORTS


def host_is_allow_listed(host: str, port: int, allowed_hosts: tuple[str, ...]) -> bool:
    """``example.com`` allows that host on ports 80 and 443; ``example.com:8080`` on that port
    only; ``.example.com`` (with or without a port) allows its subdomains too."""
    host = host.lower().strip("[]").rstrip(".")
    for entry in allowed_hosts:
        allowed, ports = _split_port(entry)
        if port not in ports:
            continue
        if allowed.startswith("."):
            if host == allowed[1:] or host.endswith(allowed):
                return True
        elif host == allowed:
            return True
    return False


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        return [literal]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UrlFetchFailedError(f"cannot resolve host {host!r}") from exc
    addresses: list[IPAddress] = []
    for info in infos:  # an IP family's sockaddr host is a str (typeshed allows int for others)
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _malformed(exc: Exception) -> InvalidUrlError:
    reason = str(exc)[:_REASON_CHARS]
    return InvalidUrlError(f"image URL cannot be parsed: {reason!r}")


def _parsed(url: str) -> tuple[SplitResult, str, int | None]:
    """The URL's parts, its host as IDNA ASCII (what DNS, ``Host`` and SNI get) and its port.

    ``urlsplit`` and ``SplitResult.port`` raise ``ValueError`` for a bad IPv6 literal or port,
    and the IDNA codec ``UnicodeError`` for an empty or over-long label: client input, so a
    domain error, not a 500."""
    try:
        parts = urlsplit(url)
        port = parts.port
        ascii_host = (parts.hostname or "").encode("idna").decode("ascii")
    except ValueError as exc:  # UnicodeError included
        raise _malformed(exc) from exc
    return parts, ascii_host, port


def _next_hop(url: str, location: str) -> str:
    try:
        return urljoin(url, location)
    except ValueError as exc:
        raise _malformed(exc) from exc


async def _checked_address(url: str, policy: FetchPolicy) -> tuple[str, str, int, IPAddress]:
    """(scheme, host, port, address to connect to) after every check on this hop; the host
    in IDNA ASCII."""
    parts, host, explicit_port = _parsed(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UrlNotAllowedError(f"URL scheme {scheme or '(none)'!r} is not allowed; use http(s)")
    if parts.username or parts.password:
        raise UrlNotAllowedError("URLs with credentials are not allowed")
    host = host.lower()
    if not host:
        raise UrlNotAllowedError("URL has no host")
    port = explicit_port or (443 if scheme == "https" else 80)
    listed = bool(policy.allowed_hosts) and host_is_allow_listed(host, port, policy.allowed_hosts)
    if policy.allowed_hosts and not listed:
        raise UrlNotAllowedError(f"host {host!r} port {port} is not in the allow-list")
    addresses = await _resolve(host, port)
    # An operator's explicit allow-list may name internal hosts; nothing else may. Which address
    # is not said: the service must not answer DNS questions for its callers.
    if not listed and not all(is_public_address(a) for a in addresses):
        raise UrlNotAllowedError(f"host {host!r} is not a public address")
    if not addresses:
        raise UrlFetchFailedError(f"host {host!r} has no address")
    return scheme, host, port, addresses[0]


# Called with the bytes the body will hold: its declared length before the first byte is read
# (so a memory budget is claimed whole or waited for, not hoarded a chunk at a time), then its
# length so far after each chunk; may wait (memory budget) or raise.
BodyProgress = Callable[[int], Awaitable[None]]


async def _fetch_hops(
    url: str, policy: FetchPolicy, client: httpx.AsyncClient, on_body: BodyProgress | None
) -> bytes:
    for _ in range(policy.max_redirects + 1):
        scheme, host, port, address = await _checked_address(url, policy)
        parts, _, explicit_port = _parsed(url)
        literal = f"[{address}]" if address.version == 6 else str(address)
        target = parts._replace(netloc=f"{literal}:{port}").geturl()
        host_header = host if explicit_port is None else f"{host}:{explicit_port}"
        request = client.build_request(
            "GET",
            target,
            headers={"Host": host_header, "Accept": "image/*"},
            extensions={"sni_hostname": host} if scheme == "https" else {},
        )
        response = await client.send(request, stream=True)
        try:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise UrlFetchFailedError("redirect without a Location header")
                url = _next_hop(url, location)
                continue
            if response.status_code != 200:
                raise UrlFetchFailedError(f"URL answered HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit():
                if int(declared) > policy.max_bytes:
                    raise ImageTooLargeError(f"URL body is larger than {policy.max_bytes} bytes")
                if on_body is not None:
                    await on_body(int(declared))
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body.extend(chunk)
                if len(body) > policy.max_bytes:
                    raise ImageTooLargeError(f"URL body is larger than {policy.max_bytes} bytes")
                if on_body is not None:
                    await on_body(len(body))
            return bytes(body)
        finally:
            await response.aclose()
    raise UrlFetchFailedError(f"more than {policy.max_redirects} redirects")


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The process's one verifying TLS context. A client left to build its own loads the whole
    CA bundle into OpenSSL's heap per fetch, and httpx's reference cycles keep it until a full
    garbage collection, so URL-heavy requests grew a worker (docs/reliability.md)."""
    return httpx.create_ssl_context(trust_env=False)


async def fetch_image_bytes(
    url: str, policy: FetchPolicy, on_body: BodyProgress | None = None
) -> bytes:
    """The body at ``url`` under ``policy``; domain errors only (never httpx's). ``on_body``
    hears of the body as it grows (the service counts it in its memory budget)."""
    if not policy.enabled:
        raise UrlNotAllowedError("image URLs are switched off here (CLIP_ALLOW_URLS=false)")
    timeout = httpx.Timeout(
        connect=policy.connect_timeout_s,
        read=policy.read_timeout_s,
        write=policy.read_timeout_s,
        pool=policy.connect_timeout_s,
    )
    # trust_env=False: no proxy from the environment may re-route a checked connection.
    client = httpx.AsyncClient(
        timeout=timeout, follow_redirects=False, trust_env=False, verify=tls_context()
    )
    async with client:
        try:
            return await asyncio.wait_for(
                _fetch_hops(url, policy, client, on_body), policy.total_timeout_s
            )
        except TimeoutError as exc:
            raise UrlFetchFailedError(f"URL took longer than {policy.total_timeout_s} s") from exc
        except httpx.HTTPError as exc:
            raise UrlFetchFailedError(f"URL fetch failed: {type(exc).__name__}") from exc
        except httpx.InvalidURL as exc:  # not an HTTPError: e.g. a control character in a path
            raise _malformed(exc) from exc


def fetch_image_bytes_sync(url: str, policy: FetchPolicy) -> bytes:
    """``fetch_image_bytes`` for threads without an event loop (the CLI's image readers): the
    same checks and hops, on a loop of its own for this one fetch."""
    return asyncio.run(fetch_image_bytes(url, policy))

"""A tiny HTTP server on 127.0.0.1 for URL-fetch tests: fixed routes, records Host headers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Route = tuple[int, dict[str, str], bytes]  # status, headers, body


class LocalServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route | Any] = {}
        self.hosts_seen: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hosts_seen.append(self.headers.get("Host", ""))
                route = server.routes.get(self.path)
                if callable(route):
                    route(self)
                    return
                status, headers, body = route or (404, {}, b"not found")
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def slow_body(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", "100")
    handler.end_headers()
    time.sleep(5)


def endless_body(handler: BaseHTTPRequestHandler) -> None:
    """Chunks without a Content-Length until the client hangs up: the cap must cut it."""
    handler.protocol_version = "HTTP/1.1"
    handler.send_response(200)
    handler.send_header("Content-Type", "image/jpeg")
    handler.end_headers()
    try:
        for _ in range(10_000):
            handler.wfile.write(b"\xff" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass


@contextmanager
def local_server() -> Iterator[LocalServer]:
    server = LocalServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()

"""The plain Starlette routes mounted beside the front end's APIs under ``/evaluator``: health,
metrics, the demo page and the docs redirect."""

from __future__ import annotations

import asyncio
from http import HTTPStatus
from pathlib import Path

import bentoml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from clip_service.bentoml_adapter import metrics_text
from clip_service.probes import FrontEndProbes

DEMO_PAGE = Path(__file__).resolve().parents[1] / "web" / "demo.html"
EVALUATOR_PATH = "/evaluator"  # where the plain routes beside the APIs are mounted
HEALTH_ROUTE = "/health"  # its 503 is a health document, not an error envelope


async def health(request: Request) -> Response:
    front_end: FrontEndProbes = bentoml.get_current_service()
    result, ready = await front_end.health()
    status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
    return JSONResponse(result.model_dump(mode="json"), status_code=status)


async def metrics(request: Request) -> Response:
    body, content_type = await asyncio.to_thread(metrics_text)
    return Response(body, media_type=content_type)


async def demo(request: Request) -> Response:
    """A no-build HTML/JS page: upload an image, type captions, see their scores as bars."""
    return HTMLResponse(await asyncio.to_thread(DEMO_PAGE.read_text))


async def docs(request: Request) -> Response:
    return RedirectResponse("/", status_code=HTTPStatus.TEMPORARY_REDIRECT)


evaluator_routes = Starlette(
    routes=[
        Route(HEALTH_ROUTE, health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/demo", demo, methods=["GET"]),
    ]
)

"""The ASGI application (Starlette): routes, API keys, body limits, CORS, errors, client disconnects.

    GET  /v1/models              the models served: `minigpt5` and `minigpt5+TARGET` per hand-off model
    POST /v1/chat/completions    stream (SSE) or not
    GET  /health, /health/ready  the gateway is up / and Triton's `minigpt5` is ready (no key needed)
    GET  /, /static/...          the chat web page (static files; it calls the API above like any client)

A client that disconnects cancels its Triton request: streaming, Starlette cancels the response's
generator and the gRPC call is cancelled on the way out; otherwise the request is awaited next to
a watch for the disconnect.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..contract import MODEL_NAME
from ..errors import MiniGPT5Error
from . import completion
from .answer import Delta, Finished
from .chat import Backends, answer
from .chat_request import parse_chat_request
from .errors import GatewayError, from_client_error
from .handoff_config import AUTO
from .settings import GatewaySettings

log = logging.getLogger("minigpt5.gateway")
STATIC_DIR = Path(__file__).parent / "static"  # the web page: no build step, no CDN
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the stream


def create_app(settings: GatewaySettings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        app.state.backends = Backends.open(settings)
        try:
            yield
        finally:
            await app.state.backends.close()

    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
            )
        )
    routes = [
        Route("/v1/models", list_models),
        Route("/v1/models/{model:path}", get_model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health),
        Route("/health/ready", ready),
        Route("/", web_page),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    handlers: dict[Any, Callable[..., Any]] = {
        GatewayError: _error_response,
        HTTPException: _http_error,
        ClientGone: _client_gone,
        Exception: _internal_error,
    }
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers, lifespan=lifespan)
    app.state.settings = settings
    return app


async def list_models(request: Request) -> JSONResponse:
    _authorize(request)
    return JSONResponse({"object": "list", "data": [_model_card(name) for name in served_models(request)]})


async def get_model(request: Request) -> JSONResponse:
    _authorize(request)
    name = request.path_params["model"]
    if name not in served_models(request):
        raise GatewayError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
    return JSONResponse(_model_card(name))


def served_models(request: Request) -> list[str]:
    backends: Backends = request.app.state.backends
    base = backends.settings.model_name
    handoffs = list(backends.handoff_clients) + ([AUTO] if backends.settings.handoff.routes else [])
    return [base, *(f"{base}+{name}" for name in handoffs)]


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "minigpt5"}


async def chat_completions(request: Request):
    _authorize(request)
    backends: Backends = request.app.state.backends
    chat = parse_chat_request(await _read_json(request, backends.settings.max_body_bytes), backends.settings)
    ids = completion.CompletionIds.new(chat.model)
    items = answer(chat, backends)
    if not chat.stream:
        *deltas, finished = await _until_disconnect(request, _collect(items))
        return JSONResponse(completion.completion_json(ids, deltas, finished))
    # The first piece is awaited before answering, so that a refusal (bad input, busy) gets its status.
    first = await _until_disconnect(request, _next(items))
    return StreamingResponse(
        _sse(ids, first, items, chat.include_usage), media_type="text/event-stream", headers=SSE_HEADERS
    )


async def _sse(ids, first, items: AsyncIterator, include_usage: bool) -> AsyncIterator[str]:
    yield completion.role_chunk(ids)
    item = first
    try:
        while not isinstance(item, Finished):
            yield completion.delta_chunk(ids, item)
            item = await anext(items)  # not through _next: this runs once per token
    except Exception as error:  # after the 200: an error event, as OpenAI sends one, then the end
        failure = _gateway_error(error)
        if failure is None:
            raise
        log.warning("stream %s ended by an error: %s", ids.id, failure.message)
        yield completion.error_event(failure.body())
        return
    yield completion.finish_chunk(ids, item)
    if include_usage:
        yield completion.usage_chunk(ids, item)
    yield completion.DONE


async def _next(items: AsyncIterator[Delta | Finished]) -> Delta | Finished:
    try:
        return await anext(items)
    except Exception as error:
        failure = _gateway_error(error)
        if failure is None:
            raise
        raise failure from None


def _gateway_error(error: Exception) -> GatewayError | None:
    """The thin client's and the hand-off client's exceptions as GatewayErrors (None: a bug, not theirs)."""
    if isinstance(error, GatewayError):
        return error
    if isinstance(error, MiniGPT5Error):
        return from_client_error(error)
    if type(error).__module__.startswith("openai"):  # the hand-off model failed
        return GatewayError(502, f"the hand-off model failed: {error}", code="handoff_failed")
    return None


async def _collect(items: AsyncIterator) -> list:
    collected = [await _next(items)]
    while not isinstance(collected[-1], Finished):
        collected.append(await _next(items))
    return collected


class ClientGone(Exception):
    """The client disconnected before its answer was sent."""


async def _until_disconnect(request: Request, awaitable):
    """Await next to a watch on the connection: a client that leaves cancels the work, and so its
    Triton call, before this returns."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)  # let the cancellation reach the gRPC call
        raise ClientGone()
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(len(body), limit)
    try:
        return json.loads(body)
    except ValueError as error:
        raise GatewayError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None


def _too_large(size: int, limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"the request body is {size} bytes, over the gateway's limit of {limit} bytes (--max-body-mib)",
        code="request_too_large",
    )


def _authorize(request: Request) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise GatewayError(
            401, "You didn't provide an API key: send `Authorization: Bearer KEY`", code="missing_api_key"
        )
    if not any(hmac.compare_digest(key.strip().encode(), known.encode()) for known in keys):
        raise GatewayError(401, "Incorrect API key provided", code="invalid_api_key")


async def web_page(request: Request) -> FileResponse:
    """The chat page (no key needed to load it: it asks for one when the API answers 401)."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """Ready when Triton's `minigpt5` model is (a gateway without its server takes no traffic)."""
    import tritonclient.grpc.aio as grpcclient_aio

    settings: GatewaySettings = request.app.state.settings
    client = grpcclient_aio.InferenceServerClient(request.app.state.backends.triton.url)
    try:
        is_ready = await asyncio.wait_for(client.is_model_ready(MODEL_NAME), timeout=5)
    except Exception as error:  # noqa: BLE001 - any failure means "not ready", with the reason
        return JSONResponse({"status": "not ready", "triton": settings.triton_url, "reason": str(error)}, 503)
    finally:
        await client.close()
    return JSONResponse(
        {"status": "ready" if is_ready else "not ready", "triton": settings.triton_url}, 200 if is_ready else 503
    )


async def _error_response(request: Request, error: GatewayError) -> JSONResponse:
    if error.status >= 500:
        log.warning("%s %s: %d %s", request.method, request.url.path, error.status, error.message)
    return JSONResponse(error.body(), error.status, headers=error.headers)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return await _error_response(
        request,
        GatewayError(
            error.status_code,
            f"{request.method} {request.url.path}: {error.detail}",
            code="not_found" if error.status_code == 404 else None,
            headers=dict(error.headers or {}),
        ),
    )


async def _client_gone(request: Request, error: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it: nginx's code for "client closed request"


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse(GatewayError(500, f"internal error: {type(error).__name__}").body(), 500)

"""The aiohttp application: routes, middlewares (errors, auth), startup and shutdown.

Every error leaves as OpenAI-style JSON (`{"error": {message, type, param, code}}`), including
aiohttp's own 404 / 405 and anything unexpected (500, logged with its traceback); the server
keeps serving after each of them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from common.service_config import CurveKeys

from services.gateway import routes, status_page
from services.gateway.anthropic import handle_count_tokens, handle_messages
from services.gateway.bus_metrics import BusInvalidMessages
from services.gateway.chat import handle_chat
from services.gateway.client import BusClient
from services.gateway.completions import handle_completions
from services.gateway.embeddings import EMBEDDING_KEY, EmbeddingSettings, handle_embeddings
from services.gateway.config import GatewayConfig
from services.gateway.context import CTX_KEY, Admission, GatewayContext, ModelInfo
from services.gateway.httpio import error_response
from services.gateway.images import ImageLimits, ImageSupport
from services.gateway.http_limits import GuardedAppRunner, HttpLimits
from services.gateway.logprobs import TokenTexts
from services.gateway.metrics import GatewayMetrics
from services.gateway.spec_metrics import SpeculativeCounters
from services.gateway.migration import MigrationPolicy
from services.gateway.openai_schema import APIError

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Probes and scrapers must work without the API key.
# The status page's static files hold no data; the page sends the key to /status itself.
AUTH_EXEMPT = frozenset(("/health", "/metrics", "/ping", *status_page.PUBLIC_PATHS))


@dataclass
class GatewaySettings:
    host: str
    port: int
    model_path: str
    frontend_addr: str
    tokens_addr: str
    gateway_id: str
    api_key: str | None = None
    # Defaults are the settings' own (GatewayConfig); __main__ passes every value anyway.
    max_queue: int = GatewayConfig.max_queue
    max_body_bytes: int = GatewayConfig.max_body_bytes
    max_model_len: int | None = None
    advertise_host: str | None = None
    curve: CurveKeys | None = None  # CurveZMQ keys for the scheduler connection
    http_header_timeout: float = GatewayConfig.http_header_timeout
    http_body_timeout: float = GatewayConfig.http_body_timeout
    http_keepalive_timeout: float = GatewayConfig.http_keepalive_timeout
    max_connections: int = GatewayConfig.max_connections
    tool_call_parser: str | None = None  # None: guessed from the chat template
    batch_dir: str | None = None  # None: no Batch API (tests that build their own app)
    max_batch_file_bytes: int = GatewayConfig.max_batch_file_bytes
    batch_max_in_flight: int = GatewayConfig.batch_max_in_flight
    batch_tpot_target_ms: float = GatewayConfig.batch_tpot_target_ms
    request_timeout: float = GatewayConfig.request_timeout
    max_migrations: int = GatewayConfig.max_migrations
    scheduler_wait: float = GatewayConfig.scheduler_wait
    embedding_pooling: str = GatewayConfig.embedding_pooling
    embedding_normalize: bool = GatewayConfig.embedding_normalize
    image_max_bytes: int = GatewayConfig.image_max_bytes
    image_fetch_timeout: float = GatewayConfig.image_fetch_timeout
    image_max_pixels: int = GatewayConfig.image_max_pixels
    max_images_per_request: int = GatewayConfig.max_images_per_request


def _from_http_exception(exc: web.HTTPException) -> APIError:
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    if exc.status == 404:
        return APIError(404, "not found: no such route", code="not_found")
    if exc.status == 405:
        return APIError(405, f"method not allowed; allowed: {exc.headers.get('Allow', '')}",
                        code="method_not_allowed", headers=headers)
    if exc.status == 413:
        return APIError(413, "request body is too large", code="request_too_large")
    return APIError(exc.status, exc.reason or "HTTP error", code=None, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except APIError as error:
        response = error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        response = error_response(_from_http_exception(exc))
    except (asyncio.CancelledError, ConnectionError):
        raise  # the client went away: nobody to answer
    except RecursionError:
        # Only input nests that deep (JSON text inside a field, e.g. a schema given as a string):
        # the client's mistake, not a server bug. parse_json_body refuses deep bodies up front.
        logger.info("refused a too deeply nested input on %s %s", request.method, request.path)
        response = error_response(APIError(400, "the request nests too deeply", code="invalid_json"))
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(APIError(500, "internal server error", code="internal_error"))
    request.app[CTX_KEY].metrics.http_responses.labels(str(response.status)).inc()
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.app[CTX_KEY].api_key
    if key and request.path not in AUTH_EXEMPT:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            token = request.headers.get("x-api-key", "")  # what Anthropic's clients send
        if not hmac.compare_digest(token.strip().encode(errors="replace"), key.encode()):
            raise APIError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )
    return await handler(request)


async def _ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


async def _on_shutdown(app: web.Application) -> None:
    # Requests still running end now with a 503 (in-band for streams) instead of holding
    # the shutdown until aiohttp's timeout; their `finally` aborts them on the workers.
    app[CTX_KEY].client.fail_all(503, "the gateway is shutting down")


def create_app(ctx: GatewayContext) -> web.Application:
    """The application for an already-built context (tests build their own context)."""
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=ctx.max_body_bytes)
    app[CTX_KEY] = ctx
    app.on_shutdown.append(_on_shutdown)
    app.router.add_post("/v1/chat/completions", handle_chat)
    app.router.add_post("/v1/completions", handle_completions)
    app.router.add_post("/v1/embeddings", handle_embeddings)
    app.router.add_post("/v1/messages", handle_messages)
    app.router.add_post("/v1/messages/count_tokens", handle_count_tokens)
    app.router.add_get("/v1/models", routes.handle_models)
    app.router.add_get("/v1/models/{model:.+}", routes.handle_model)
    app.router.add_get("/health", routes.handle_health)
    app.router.add_get("/ping", _ping)
    app.router.add_get("/status", routes.handle_status)
    app.router.add_get("/metrics", routes.handle_metrics)
    status_page.add_routes(app)  # the operator's page at / and /ui
    app.router.add_post("/tokenize", routes.handle_tokenize)
    app.router.add_post("/detokenize", routes.handle_detokenize)
    return app


async def build_context(settings: GatewaySettings) -> GatewayContext:
    """Load the tokenizer (in a thread: it takes seconds) and wire the shared objects."""
    from common.tokenizer import load_tokenizer

    loop = asyncio.get_running_loop()
    tokenizer = await loop.run_in_executor(None, load_tokenizer, settings.model_path)
    model = await loop.run_in_executor(None, ModelInfo.from_path, settings.model_path, settings.max_model_len)
    metrics = GatewayMetrics(model.model_id)
    client = BusClient(settings.frontend_addr, settings.tokens_addr, settings.gateway_id,
                       advertise_host=settings.advertise_host, curve=settings.curve,
                       migration=MigrationPolicy(max_migrations=settings.max_migrations,
                                                 request_timeout_s=settings.request_timeout,
                                                 scheduler_wait_s=settings.scheduler_wait))
    client.on_status = metrics.update_workers
    client.on_scheduler = metrics.update_scheduler
    metrics.registry.register(BusInvalidMessages(lambda: client.scheduler_info))
    limits = ImageLimits(max_bytes=settings.image_max_bytes, fetch_timeout_s=settings.image_fetch_timeout,
                         max_pixels=settings.image_max_pixels, max_images=settings.max_images_per_request)
    images = await loop.run_in_executor(None, ImageSupport.load, settings.model_path, tokenizer, limits)
    metrics.registry.register(SpeculativeCounters(lambda: client.instances))
    return GatewayContext(
        model=model, tokenizer=tokenizer, token_texts=TokenTexts(tokenizer), client=client, metrics=metrics,
        admission=Admission(settings.max_queue), api_key=settings.api_key, max_body_bytes=settings.max_body_bytes,
        tool_call_parser=settings.tool_call_parser, images=images,
    )


async def serve(settings: GatewaySettings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or `stop` is set), then shut down cleanly."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass  # not the main thread (tests): the caller sets `stop`
    ctx = await build_context(settings)
    await ctx.client.start()
    # handler_cancellation: a client that goes away cancels its handler, whose `finally` aborts
    # the request on the worker (for non-streaming requests nothing else would notice).
    # shutdown_timeout: streams still open at shutdown get a few seconds, not aiohttp's 60.
    app = create_app(ctx)
    app[EMBEDDING_KEY] = EmbeddingSettings(settings.embedding_pooling, settings.embedding_normalize)
    if settings.batch_dir is not None:
        from services.gateway.batch import self_url, setup_batch_api

        setup_batch_api(app, ctx, batch_dir=settings.batch_dir, url=self_url(settings.host, settings.port),
                        api_key=settings.api_key, max_file_bytes=settings.max_batch_file_bytes,
                        max_offline_in_flight=settings.batch_max_in_flight,
                        tpot_target_s=settings.batch_tpot_target_ms / 1000)
    # GuardedAppRunner: header/body/keep-alive timeouts, the connection cap, JSON for unparseable
    # requests (services/gateway/http_limits.py).
    limits = HttpLimits(settings.http_header_timeout, settings.http_body_timeout, settings.http_keepalive_timeout,
                        settings.max_connections)
    runner = GuardedAppRunner(app, limits=limits, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
    try:
        await site.start()
        logger.warning("gateway %s serving %s on http://%s:%d", settings.gateway_id, ctx.model.model_id,
                       settings.host, settings.port)
        await stop.wait()
    finally:
        await runner.cleanup()
        await ctx.client.close()
        if ctx.images is not None:
            await ctx.images.close()

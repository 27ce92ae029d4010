"""The Litestar app (`create_app`) and `run_server`, which `gdsllm serve` calls."""

import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import anyio
import uvicorn
from litestar import Litestar, get
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Schema

from gdsllm_core import __version__, settings
from gdsllm_core.errors import GdsllmError
from gdsllm_core.layout.store import ModelStore
from gdsllm_core.server import urls
from gdsllm_core.server.deps import DEPENDENCIES
from gdsllm_core.server.embeddings import EmbeddingsController
from gdsllm_core.server.errors import EXCEPTION_HANDLERS
from gdsllm_core.server.guards import PUBLIC, bearer_token_guard
from gdsllm_core.server.ollama import OllamaController
from gdsllm_core.server.ollama_models import OllamaModelsController
from gdsllm_core.server.openai import OpenAIController
from gdsllm_core.server.schemas import HealthResponse
from gdsllm_core.server.security import BrowserGuardMiddleware, cors_config, is_loopback_address
from gdsllm_core.server.streams import Engine, cancel_open_generations

if TYPE_CHECKING:
    from gdsllm_core.engine.forward import LoadOptions

log = logging.getLogger("gdsllm.server")
GRACEFUL_SHUTDOWN_S = 10
STREAMED_BODIES = {urls.OLLAMA_GENERATE: ("application/x-ndjson", "one JSON object per line, the last with done"),
                   urls.OLLAMA_CHAT: ("application/x-ndjson", "one JSON object per line, the last with done"),
                   urls.OLLAMA_PULL: ("application/x-ndjson", "progress objects, the last with status success"),
                   urls.OLLAMA_CREATE: ("application/x-ndjson", "progress objects, the last with status success"),
                   urls.OPENAI_CHAT: ("text/event-stream", "chat.completion.chunk events, then [DONE]"),
                   urls.OPENAI_COMPLETIONS: ("text/event-stream", "text_completion events, then [DONE]")}


@get(urls.HEALTH, opt=PUBLIC, tags=["server"])
async def health() -> HealthResponse:
    """Liveness: always open, even with GDSLLM_API_TOKEN set."""
    return HealthResponse("ok")


def real_engine(store: ModelStore, options: "LoadOptions | None" = None) -> Engine:
    from gdsllm_core.engine.engine import Engine as GdsllmEngine  # imports torch and the plugins: not at import

    return GdsllmEngine(store=store, options=options)


@asynccontextmanager
async def engine_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Make the engine (and load the preloaded model) before serving; close it after the last response."""
    state = app.state
    log.info("gdsllm %s: auth %s", __version__, "ON (bearer token from GDSLLM_API_TOKEN)" if state.auth else
             "OFF: open access, anyone who reaches this port can use it (set GDSLLM_API_TOKEN to require a token)")
    state.engine = await anyio.to_thread.run_sync(state.engine_factory)
    try:
        if state.preload and state.default_model:
            log.info("loading %s", state.default_model)
            await anyio.to_thread.run_sync(state.engine.load, state.default_model)
        yield
    finally:
        await anyio.to_thread.run_sync(state.engine.close)


def document_streamed_bodies(app: Litestar) -> None:
    """Litestar documents one media type per status: add the NDJSON / SSE bodies the generation routes stream."""
    for path, (media_type, description) in STREAMED_BODIES.items():
        content = app.openapi_schema.paths[path].post.responses["200"].content
        if media_type == "text/event-stream":  # each event: its `data` field carries one JSON chunk (or [DONE])
            schema = Schema(type=OpenAPIType.OBJECT, description=description,
                            properties={"data": Schema(type=OpenAPIType.STRING),
                                        "event": Schema(type=OpenAPIType.STRING)})
        else:
            schema = Schema(type=OpenAPIType.STRING, description=description)
        content[media_type] = OpenAPIMediaType(schema=schema)


def create_app(store: ModelStore | None = None, default_model: str | None = None, preload: bool = False,
               engine_factory: Callable[[], Engine] | None = None, api_token: str | None = None,
               read_token_from_env: bool = True, options: "LoadOptions | None" = None,
               bind_host: str | None = None) -> Litestar:
    """The server app. `engine_factory` makes the engine in the lifespan (default: the real Engine on `store`);
    the bearer token is `api_token`, else GDSLLM_API_TOKEN unless `read_token_from_env` is False. Bound to a
    loopback `bind_host`, requests must name a loopback Host (see server/security.py)."""
    store = store or ModelStore()
    cors = cors_config()
    token = api_token or (settings.api_token() if read_token_from_env else None)
    state = State({"store": store, "default_model": default_model, "preload": preload, "auth": token is not None,
                   "engine_factory": engine_factory or (lambda: real_engine(store, options)), "engine": None})
    app = Litestar(
        route_handlers=[health, OllamaController, OpenAIController, EmbeddingsController, OllamaModelsController],
        dependencies=DEPENDENCIES,
        guards=[bearer_token_guard(token)] if token else [],
        exception_handlers=EXCEPTION_HANDLERS,
        cors_config=cors,
        middleware=[BrowserGuardMiddleware(cors, loopback_only=bind_host is not None
                                           and is_loopback_address(bind_host))],
        lifespan=[engine_lifespan],
        state=state,
        logging_config=None,  # run_server (uvicorn) owns logging; the app only logs to "gdsllm.server"
        openapi_config=OpenAPIConfig(title="gdsllm", version=__version__, path=urls.SCHEMA),
    )
    document_streamed_bodies(app)
    return app


class GracefulServer(uvicorn.Server):
    """On SIGINT/SIGTERM, first ends every generation being answered (each stream then sends its final chunk:
    ollama's done object, OpenAI's finish chunk and [DONE]), then shuts down as uvicorn does."""

    def handle_exit(self, sig: int, frame) -> None:
        cancel_open_generations()
        super().handle_exit(sig, frame)


def serve(app: Litestar, sock: socket.socket) -> None:
    """Serve `app` on the bound `sock` until SIGINT/SIGTERM (open responses get GRACEFUL_SHUTDOWN_S to finish)."""
    host, port = sock.getsockname()[:2]
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                           log_level="info"))
    with sock, return_after_stop_signals():
        server.run(sockets=[sock])


@contextmanager
def return_after_stop_signals() -> Iterator[None]:
    """uvicorn re-raises SIGINT/SIGTERM once it has shut down gracefully; absorb that so `run_server` returns
    normally and its caller's cleanup (the CLI's pid file) runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class PortUnavailableError(GdsllmError):
    pass


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound now (before any model loads), so that a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortUnavailableError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                   "another server (a gdsllm or ollama?) uses that port: stop it or pick "
                                   "another with --port") from None
    return sock


def warn_if_exposed(host: str, token: str | None) -> None:
    """A loud warning when the server is reachable from other machines with no token."""
    if not is_loopback_address(host) and not token:
        log.warning("!" * 100)
        log.warning("listening on %s WITHOUT A TOKEN: anyone who can reach this machine can run and delete models. "
                    "Set GDSLLM_API_TOKEN, or serve on 127.0.0.1.", host)
        log.warning("!" * 100)


def run_server(model: str | None, host: str = "127.0.0.1", port: int = 8000, preload: bool = False,
               store: ModelStore | None = None, options: "LoadOptions | None" = None,
               sock: socket.socket | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn finishes open responses for up to GRACEFUL_SHUTDOWN_S seconds, then
    cancels them, which cancels their generations, then closes the engine). `model` is what requests naming no
    model get, loaded at start with `preload`. `sock` is the socket from `listen_socket` (bound here if None)."""
    store = store or ModelStore()
    if model:
        store.get(model)  # fail before binding the port when the model is not there
    sock = sock or listen_socket(host, port)
    if not logging.getLogger("gdsllm").handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logging.getLogger("gdsllm").addHandler(handler)
        logging.getLogger("gdsllm").setLevel(logging.INFO)
    warn_if_exposed(host, settings.api_token())
    serve(create_app(store=store, default_model=model, preload=preload, options=options, bind_host=host), sock)

"""Safe by default on a desktop: what a web page in the user's browser must not be able to do to a local server.

- CORS (Litestar's CORSConfig, outermost): browsers may read answers only for the allowed origins
  (settings.origins(): loopback and desktop-app origins, plus GDSLLM_ORIGINS); preflights are answered before any
  guard, so they never need the token.
- `BrowserGuardMiddleware` (inside CORS, before routing and guards):
  - a request whose Origin is not allowed is refused (403), as ollama does;
  - bound to a loopback address, the Host header must name a loopback host (DNS rebinding gets 403);
  - a body must be JSON: a JSON content type or none (curl's default form type only without an Origin, so a page
    cannot send it), else 415;
  - JSON nested deeper than MAX_JSON_DEPTH is refused (400) before anything decodes it.
Every refusal is in the dialect's error shape."""

import ipaddress
import re
import socket

import numpy as np
from litestar.config.cors import CORSConfig
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gdsllm_core import settings
from gdsllm_core.server.errors import error_body

MAX_JSON_DEPTH = 128  # deeper than any real request (JSON schemas included); msgspec recurses once per level
JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)  # strings hide brackets from the depth count
JSON_TYPE = re.compile(r"^application/(?:[\w.+-]+\+)?json$")
FORM_TYPE = "application/x-www-form-urlencoded"  # what `curl -d` sends; a browser page cannot send it without Origin
LOCAL_SUFFIXES = (".localhost",)  # RFC 6761: resolves to loopback


def cors_config() -> CORSConfig:
    """Litestar's CORS handling for the allowed origins (any method and header, as ollama's)."""
    return CORSConfig(allow_origins=settings.origins(), allow_methods=["*"], allow_headers=["*"])


def is_loopback_address(host: str) -> bool:
    """True for a name or address that only this machine can reach (localhost, 127.0.0.0/8, ::1)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(LOCAL_SUFFIXES):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8000" -> "::1")."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_host_names() -> set[str]:
    """Loopback names plus this machine's own name (what a local browser may put in Host)."""
    return {"localhost", socket.gethostname().lower()}


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not count)."""
    structure = np.frombuffer(JSON_STRING.sub(b'""', body), dtype=np.uint8)
    steps = np.zeros(structure.shape, dtype=np.int64)
    steps[(structure == ord("[")) | (structure == ord("{"))] = 1
    steps[(structure == ord("]")) | (structure == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


class BrowserGuardMiddleware(ASGIMiddleware):
    """Origin allow-list, Host check (when `loopback_only`), JSON content type and nesting depth."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, cors: CORSConfig, loopback_only: bool):
        self.cors = cors
        self.loopback_only = loopback_only

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        path = scope["path"]
        origin = headers.get("origin")
        if origin is not None and not self.cors.is_origin_allowed(origin):
            await refuse(send, path, 403, f"origin {origin!r} is not allowed (set GDSLLM_ORIGINS to allow it)")
            return
        if self.loopback_only:
            host = host_name(headers.get("host", "")).lower()
            if not (is_loopback_address(host) or host in allowed_host_names()):
                await refuse(send, path, 403, f"host {host!r} is not allowed: the server is bound to a loopback "
                                              "address (serve with --host to accept other names)")
                return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await next_app(scope, receive, send)
            return
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and not JSON_TYPE.match(content_type) and not (content_type == FORM_TYPE and origin is None):
            await refuse(send, path, 415, f"content type {content_type!r} is not accepted: send JSON with "
                                          "`Content-Type: application/json`")
            return
        messages, body = await read_body(receive)
        if body and json_depth(body) > MAX_JSON_DEPTH:
            await refuse(send, path, 400, f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")
            return
        await next_app(scope, replay(messages, receive), send)


async def read_body(receive: Receive) -> tuple[list[Message], bytes]:
    """Every message of the request body, and the body's bytes."""
    messages, parts = [], []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return messages, b"".join(parts)


def replay(messages: list[Message], receive: Receive) -> Receive:
    """A `receive` that gives `messages` again, then the connection's own."""
    pending = list(messages)

    async def replayed() -> Message:
        return pending.pop(0) if pending else await receive()

    return replayed


async def refuse(send: Send, path: str, status: int, message: str) -> None:
    body = error_body(path, status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

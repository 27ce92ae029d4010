"""The bearer-token guard: with GDSLLM_API_TOKEN set, every route but those marked `opt={"public": True}`
(/health) needs `Authorization: Bearer <token>`, compared in constant time."""

import hmac

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

PUBLIC = {"public": True}


def bearer_token_guard(token: str) -> Guard:
    expected = token.encode()

    def require_token(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
        if handler.opt.get("public"):
            return
        scheme, _, value = connection.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), expected):
            raise NotAuthorizedException(
                "missing or wrong API token: send the header `Authorization: Bearer <GDSLLM_API_TOKEN>`",
                headers={"WWW-Authenticate": "Bearer"})

    return require_token

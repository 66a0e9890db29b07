"""What a master serves its nodes (``cube master``), under ``/cluster/v1`` on its API port.

Every request must carry the cluster token in ``x-cube-cluster-token`` (else 401, checked before
the body is read; the token is never logged). Errors travel as in :mod:`cube_core.nodehttp`
(``{"error", "message", "fields"}``, the status from :func:`~cube_core.nodehttp.error_status`),
so the node rebuilds the same :class:`~cube_core.errors.CubeError`.

- ``POST /cluster/v1/secrets`` :class:`~cube_core.nodesecrets.SecretAsk` ->
  :class:`~cube_core.nodesecrets.SecretAnswer`: a secret for a sandbox placed on the asking node
  (:class:`~cube_core.nodesecrets.PlacedSecrets`); 404 for anything else, 429 over the rate.
"""

from __future__ import annotations

import hmac

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from cube_core.credentials import SecretLookupLimitedError
from cube_core.errors import CubeError, NodeError
from cube_core.nodehttp import TOKEN_HEADER, ErrorBody, error_body, error_status
from cube_core.nodesecrets import SECRETS_PATH, PlacedSecrets, SecretAnswer, SecretAsk

log = structlog.get_logger(__name__)

MAX_BODY = 4096


def cluster_router(secrets: PlacedSecrets, token: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    expected = token.encode()

    @router.post(SECRETS_PATH)
    async def secret(request: Request) -> JSONResponse:
        given = request.headers.getlist(TOKEN_HEADER)
        if len(given) != 1 or not hmac.compare_digest(given[0].encode("latin-1"), expected):
            log.warning("request without the cluster token refused", path=request.url.path,
                        client=request.client.host if request.client else None, token_given=bool(given))
            return _error(401, ErrorBody(error=NodeError.__name__,
                                         message=f"missing or wrong cluster token ({TOKEN_HEADER})"))
        body = await request.body()
        try:
            if len(body) > MAX_BODY:
                raise ValueError(f"more than {MAX_BODY} bytes")
            ask = SecretAsk.model_validate_json(body)
        except (ValidationError, ValueError) as exc:
            return _error(422, ErrorBody(error=NodeError.__name__,
                                         message=f"malformed secret look-up: {exc}"[:2000]))
        try:
            value = await secrets.reveal(ask.node_id, ask.sandbox_id, ask.name)
        except CubeError as exc:
            status = 429 if isinstance(exc, SecretLookupLimitedError) else error_status(exc)
            return _error(status, error_body(exc))
        return JSONResponse(SecretAnswer(value=value).model_dump(mode="json"),
                            headers={"cache-control": "no-store"})

    return router


def _error(status: int, body: ErrorBody) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status_code=status)

"""THE table from Cube errors to HTTP: status, E2B error body and the ``Should-Retry`` header.

Every error the control plane answers has the E2B body ``{"code": int, "message": str}`` (plus
``error_code`` where E2B defines one); the generated SDK client requires both keys. Every error also
carries ``Should-Retry``: the SDK retries 429/502/503/504 *unless* the header says ``false``, and any
status when it says ``true``. We answer ``true`` only where repeating the request is safe and may
succeed (nothing was created and capacity may free up), with ``Retry-After``; ``false`` everywhere
else, in particular on failed creates, because Cube does not implement ``Idempotency-Key``.

The edge proxy's answers (502 "... was not found" / "... port is not open", E2B_PROTOCOL.md §4.4,
and 502 "... could not be reached: ..." for a node that is down) are built here too, so this
module is the only place that turns a Cube error into HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cube_core import (
    AdmissionRejectedError,
    AuthError,
    CapacityError,
    ConfigError,
    CubeError,
    GuestProtocolError,
    GuestTimeoutError,
    InvalidStateError,
    NetworkError,
    NoCapacityError,
    NodeError,
    NodeUnavailableError,
    PluginError,
    QuotaExceededError,
    SandboxError,
    SandboxNotFoundError,
    SchedulingError,
    SnapshotInUseError,
    SnapshotNotFoundError,
    StorageError,
    TemplateBuildError,
    TemplateError,
    TemplateNotFoundError,
    UnsupportedOperation,
    VmmError,
    VolumeFullError,
    VolumeInUseError,
    VolumeNameTakenError,
    VolumeNotFoundError,
    VolumePathError,
    VolumePathNotFoundError,
)
from cube_core.credentials import CredentialNotFoundError, SecretExistsError, SecretsDisabledError
from cube_core.teamsecrets import SecretRequestError
from cube_core.templatebuilds import (
    BuildRequestError,
    TagNotServedError,
    TemplateInUseError,
    TemplateNameTakenError,
    TemplateNotOwnedError,
    TemplateProtectedError,
    UploadRefusedError,
)
from cube_core.webhooks import WebhookLimitError, WebhookNotFoundError, WebhookRequestError, WebhooksDisabledError


class InvalidRequestError(CubeError):
    """A request field is missing, malformed or asks for something this server cannot do (HTTP 400)."""

    msg_fmt = "{field}: {reason}"


class ForbiddenError(CubeError):
    """The caller's team may not read what it asked for, e.g. another team's metrics (HTTP 403)."""

    msg_fmt = "{reason}"


class GoneError(CubeError):
    """A route of the E2B API that Cube answers but does not serve, e.g. the deprecated Docker
    registry build flow (HTTP 410): the message says what to use instead."""

    msg_fmt = "{reason}"


@dataclass(frozen=True)
class HttpError:
    """How one error is answered."""

    status: int
    retry: bool = False
    error_code: str | None = None


#: Cube error class -> answer. Looked up along the exception's MRO, so the most specific class wins.
ERROR_TABLE: dict[type[CubeError], HttpError] = {
    InvalidRequestError: HttpError(400),
    ForbiddenError: HttpError(403),
    GoneError: HttpError(410),
    SecretRequestError: HttpError(400),
    CredentialNotFoundError: HttpError(404),  # another team's secret, key or token too
    SecretExistsError: HttpError(409),
    # [core] secrets_key unset: 403 as E2B answers a feature not enabled for a team (the spec lists no
    # 501/503 for /secrets); the message says how to configure it, Should-Retry false.
    SecretsDisabledError: HttpError(403),
    WebhookRequestError: HttpError(400),  # DestinationRefusedError too: the URL names a refused address
    WebhookNotFoundError: HttpError(404),  # another team's webhook too
    WebhookLimitError: HttpError(429),  # Should-Retry false: deleting a webhook frees a slot, not waiting
    WebhooksDisabledError: HttpError(403),  # [core] secrets_key unset, as for /secrets
    AuthError: HttpError(401),
    SandboxNotFoundError: HttpError(404),
    TemplateNotFoundError: HttpError(404),
    BuildRequestError: HttpError(400),
    TemplateNameTakenError: HttpError(409),
    TemplateInUseError: HttpError(409),
    TemplateProtectedError: HttpError(403),
    TemplateNotOwnedError: HttpError(403),  # built in or another team's published one: it sees it, not its builds
    TagNotServedError: HttpError(400),
    UploadRefusedError: HttpError(403),
    SnapshotNotFoundError: HttpError(404),
    SnapshotInUseError: HttpError(409),
    VolumeNotFoundError: HttpError(404),  # another team's volume too
    VolumePathNotFoundError: HttpError(404),
    VolumePathError: HttpError(400),
    VolumeNameTakenError: HttpError(409),
    VolumeInUseError: HttpError(409),  # mounted read-write elsewhere; VolumeMountedError: snapshot refused
    VolumeFullError: HttpError(507),  # the volume's quota is used up
    InvalidStateError: HttpError(409),
    QuotaExceededError: HttpError(429),  # Should-Retry false: only freeing a slot helps, not waiting
    AdmissionRejectedError: HttpError(403),  # retryable rejections: 429, see http_error()
    NoCapacityError: HttpError(503, retry=True, error_code="sandbox_capacity_unavailable"),
    SchedulingError: HttpError(503, retry=True, error_code="sandbox_no_compatible_node"),
    # the sandbox's node is down or unreachable: the SDK raises ServiceBusyException with our message.
    # No Should-Retry: the node missed heartbeats for down_after_s already, and a create is not idempotent.
    NodeUnavailableError: HttpError(503, error_code="sandbox_node_unavailable"),
    NodeError: HttpError(502),  # a node refused or garbled a request of the control plane
    CapacityError: HttpError(503, error_code="sandbox_capacity_unavailable"),
    GuestTimeoutError: HttpError(504, error_code="sandbox_create_failed"),
    GuestProtocolError: HttpError(502),  # the guest answered garbage; its sandbox is stopped: no retry
    TemplateBuildError: HttpError(500),
    TemplateError: HttpError(503),  # e.g. still building: come back later, not in a retry loop
    UnsupportedOperation: HttpError(501),
    VmmError: HttpError(500, error_code="sandbox_create_failed"),
    NetworkError: HttpError(500),
    StorageError: HttpError(500),
    SandboxError: HttpError(500),
    ConfigError: HttpError(500),
    PluginError: HttpError(500),
    CubeError: HttpError(500, error_code="internal_server_error"),
}

INTERNAL = HttpError(500, error_code="internal_server_error")


def http_error(exc: CubeError) -> HttpError:
    """The answer for ``exc``: the entry of its most specific class in :data:`ERROR_TABLE`."""
    if isinstance(exc, AdmissionRejectedError) and getattr(exc, "retryable", False):
        return HttpError(429, retry=True)
    if isinstance(exc, NetworkError) and "field" in exc.fields:
        return HttpError(400)  # the network plugin refused a policy field (e.g. allow_out[0])
    for cls in type(exc).__mro__:
        found = ERROR_TABLE.get(cls)
        if found is not None:
            return found
    return INTERNAL


def error_body(status: int, message: str, error_code: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"code": status, "message": message}
    if error_code:
        body["error_code"] = error_code
    return body


def error_headers(answer: HttpError, retry_after_s: int) -> dict[str, str]:
    headers = {"Should-Retry": "true" if answer.retry else "false"}
    if answer.retry and retry_after_s > 0:
        headers["Retry-After"] = str(retry_after_s)
    return headers


# -- the edge proxy (E2B_PROTOCOL.md §4.4: the SDK matches these texts) -------------------------

SANDBOX_NOT_FOUND = "The sandbox was not found"
PORT_NOT_OPEN = "The sandbox is running but port is not open"
SANDBOX_UNREACHABLE = "The sandbox could not be reached"
#: The node agent that runs the sandbox did not answer the edge (its guest may be fine).
NODE_UNREACHABLE = f"{SANDBOX_UNREACHABLE}: its node is unavailable, retry later"


def edge_error_body(status: int, message: str, sandbox_id: str | None = None) -> bytes:
    body: dict[str, object] = {"code": status, "message": message}
    if sandbox_id is not None:
        body = {"sandboxId": sandbox_id, **body}
    return json.dumps(body).encode()


def edge_error_for(exc: CubeError) -> tuple[int, str]:
    """(status, message) for a Cube error raised while routing edge traffic.

    A sandbox on a node that is down is 502 "The sandbox could not be reached: node ... is
    unavailable ...": the status and wording of E2B's edge for a sandbox in an unknown state, which
    the SDK raises as ``SandboxUnreachableException`` over HTTP and Connect alike (a 503 would be a
    bare ``SandboxException`` on envd's HTTP routes); never "was not found", which means killed."""
    if isinstance(exc, SandboxNotFoundError):
        return 502, SANDBOX_NOT_FOUND
    return 502, f"{SANDBOX_UNREACHABLE}: {exc.message}"

"""outrider-client: a light, typed client for the Outrider sidecar's gRPC API.

    from outrider_client import Client

    with Client("127.0.0.1:50051") as client:
        with client.session(user_id="u1", tenant_id="acme") as s:
            result = s.run_tools("Where is order A1?")
            print(result.content)

`AsyncClient` is the asyncio twin. Depends on grpcio, protobuf and outrider-contract only;
with opentelemetry-api installed, calls carry the current span as `traceparent`.
"""

from outrider_client._aio import AsyncClient, AsyncSession
from outrider_client._common import LocalTool, MessageLike, ToolLoopResult, ToolResult
from outrider_client._errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutriderError,
    PermissionDeniedError,
    QuotaExceededError,
    SessionEndedError,
    ToolLoopError,
    ToolRejectedError,
    UnauthenticatedError,
    UnavailableError,
)
from outrider_client._sync import Client, Session

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LocalTool",
    "MessageLike",
    "NotFoundError",
    "OutriderError",
    "PermissionDeniedError",
    "QuotaExceededError",
    "Session",
    "SessionEndedError",
    "ToolLoopError",
    "ToolRejectedError",
    "ToolLoopResult",
    "ToolResult",
    "UnauthenticatedError",
    "UnavailableError",
]

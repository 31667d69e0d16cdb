"""The Outrider sidecar (data plane). `outrider sidecar --config FILE` runs `run`.

Every agent call goes through one transport-independent pipeline (`_pipeline`: session, input
guards, quotas, execution, output guards, price, one record, response); the gRPC servicer
(`_grpc`) only maps its messages onto it. The seams are sub-packages: `routing/` (sessions,
router, versions, control and registry tailers, drain), `upstream/` (provider, SSE, tools,
prices), `resilience/` (executor, breakers, retries, budgets, buckets, quotas), `guards/`,
`shadow/` (mirroring, comparison, the judge) and `telemetry/` (queue, spill, spans, metrics).
What is importable from here is the public surface, pinned by tests/unit/test_sidecar_config.py.
"""

from outrider.clock import Clock, ManualClock, SystemClock
from sidecar._app import Sidecar, SidecarError, run
from sidecar._config import ConfigError, SidecarConfig, load_config, parse_duration
from sidecar._version_config import ToolConfig, VersionConfig
from sidecar._version_file import VersionFile, load_version_file, parse_version_file
from sidecar.routing._router import Assignment, Router
from sidecar.routing._session import Session, SessionCodec, SessionError, SessionExpired, UnknownSession
from sidecar.upstream._exceptions import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamInvalidResponse,
    UpstreamStatusError,
    UpstreamTimeout,
)

__all__ = [
    "VersionFile",
    "load_version_file",
    "parse_version_file",
    "Assignment",
    "Clock",
    "ConfigError",
    "ManualClock",
    "Router",
    "Session",
    "SessionCodec",
    "SessionError",
    "SessionExpired",
    "Sidecar",
    "SidecarConfig",
    "SidecarError",
    "SystemClock",
    "ToolConfig",
    "UnknownSession",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamInvalidResponse",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "VersionConfig",
    "load_config",
    "parse_duration",
    "run",
]

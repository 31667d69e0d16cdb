"""The Outrider sidecar (data plane): the agent-facing gRPC API, session pinning, routing,
upstream clients and the telemetry producer. `outrider sidecar --config FILE` runs `run`."""

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

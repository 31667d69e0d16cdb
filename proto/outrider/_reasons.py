"""`google.rpc.ErrorInfo` reasons on the sidecar's FAILED_PRECONDITION answers, so an agent can
tell "open a new session" from other failed preconditions without parsing messages."""

#: ErrorInfo.domain of every Outrider reason.
ERROR_DOMAIN = "outrider.io"
#: The session's version was rolled back or aborted and its drain timeout passed: open a new session.
SESSION_DRAINED = "SESSION_DRAINED"
#: The session passed its expiry or the sidecar's max_session_duration: open a new session.
SESSION_EXPIRED = "SESSION_EXPIRED"
#: Reserved: a feature flag turned the capability off.
FLAG_OFF = "FLAG_OFF"
#: The tool call was rejected: by the tool itself (an HTTP 4xx; metadata tool, http_status) or by policy.
TOOL_REJECTED = "TOOL_REJECTED"

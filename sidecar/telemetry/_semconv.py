"""Every span name, attribute and event name the sidecar emits, in one place.

The `gen_ai.*` names follow the OpenTelemetry GenAI semantic conventions v1.41 (the names
the current Python GenAI helpers emit: `gen_ai.provider.name`, not the retired
`gen_ai.system`). They are still "development" status upstream, so they live here as
plain constants rather than imported from `opentelemetry.semconv._incubating`: when the
conventions move, this module is the one place to follow them. Our own attributes live
under `outrider.*`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

# --- operations and span names -----------------------------------------------------------

OPERATION_CHAT: Final = "chat"
OPERATION_EXECUTE_TOOL: Final = "execute_tool"
OPERATION_INVOKE_AGENT: Final = "invoke_agent"

# child spans and span events (ours; the conventions define none for retries or fallbacks)
ATTEMPT_SPAN: Final = "attempt"
ATTEMPT_EVENT: Final = "attempt"
FALLBACK_EVENT: Final = "fallback"


def chat_span_name(model: str) -> str:
    """`chat {gen_ai.request.model}`, or just `chat` when the model is not known yet."""
    return f"{OPERATION_CHAT} {model}" if model else OPERATION_CHAT


def agent_span_name(agent: str) -> str:
    """`invoke_agent {gen_ai.agent.name}`."""
    return f"{OPERATION_INVOKE_AGENT} {agent}" if agent else OPERATION_INVOKE_AGENT


def tool_span_name(tool: str) -> str:
    """`execute_tool {gen_ai.tool.name}`."""
    return f"{OPERATION_EXECUTE_TOOL} {tool}" if tool else OPERATION_EXECUTE_TOOL


# --- gen_ai.* (OpenTelemetry GenAI semantic conventions) ---------------------------------

GEN_AI_OPERATION_NAME: Final = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME: Final = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
GEN_AI_REQUEST_TEMPERATURE: Final = "gen_ai.request.temperature"
GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TOP_P: Final = "gen_ai.request.top_p"
GEN_AI_REQUEST_STREAM: Final = "gen_ai.request.stream"
GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS: Final = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
GEN_AI_CONVERSATION_ID: Final = "gen_ai.conversation.id"
GEN_AI_AGENT_NAME: Final = "gen_ai.agent.name"
GEN_AI_TOOL_NAME: Final = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID: Final = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE: Final = "gen_ai.tool.type"
# opt-in content (see CAPTURE_CONTENT_ENV): JSON arrays of {"role", "parts": [...]}
GEN_AI_INPUT_MESSAGES: Final = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES: Final = "gen_ai.output.messages"
GEN_AI_TOOL_CALL_ARGUMENTS: Final = "gen_ai.tool.call.arguments"
GEN_AI_TOOL_CALL_RESULT: Final = "gen_ai.tool.call.result"
# the GenAI proposal for what happened to a tool call: executed, or simulated (not run)
GEN_AI_TOOL_CALL_DISPOSITION: Final = "gen_ai.tool.call.disposition"
TOOL_DISPOSITION_EXECUTE: Final = "execute"
TOOL_DISPOSITION_SIMULATE: Final = "simulate"
OUTRIDER_TOOL_INTERCEPTED: Final = "outrider.tool.intercepted"

# general conventions
ERROR_TYPE: Final = "error.type"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"

# well-known values
TOOL_TYPE_FUNCTION: Final = "function"
ERROR_TYPE_OTHER: Final = "_OTHER"  # the conventions' fallback value for error.type

# --- outrider.* (ours) -------------------------------------------------------------------

OUTRIDER_VERSION_ID: Final = "outrider.version.id"
OUTRIDER_ROLE: Final = "outrider.role"
OUTRIDER_COST_USD: Final = "outrider.cost.usd"
OUTRIDER_QUOTA_WAIT_MS: Final = "outrider.quota.wait_ms"
OUTRIDER_GUARD_HITS: Final = "outrider.guard.hits"
OUTRIDER_FALLBACK_TIER: Final = "outrider.fallback.tier"
OUTRIDER_ATTEMPT: Final = "outrider.attempt"
OUTRIDER_DEGRADED: Final = "outrider.degraded"
OUTRIDER_FALLBACK_REASON: Final = "outrider.fallback.reason"
OUTRIDER_DURATION_MS: Final = "outrider.duration_ms"  # on `attempt` events

# --- opt-in message content --------------------------------------------------------------

CAPTURE_CONTENT_ENV: Final = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

# Older instrumentations read "true"/"false"; the GenAI utils read a content mode
# (NO_CONTENT, SPAN_ONLY, EVENT_ONLY, SPAN_AND_EVENT). We record content on spans, so any
# mode that is not "no content" turns it on. Unknown values keep it off: never by accident.
_CAPTURE_ON: Final = frozenset({"true", "1", "yes", "on", "span_only", "event_only", "span_and_event"})


def capture_content_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether prompt and completion text may be recorded (default: no)."""
    env = os.environ if environ is None else environ
    return env.get(CAPTURE_CONTENT_ENV, "").strip().lower() in _CAPTURE_ON

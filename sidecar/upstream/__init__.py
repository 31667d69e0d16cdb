"""Upstreams: the provider's wire format and the tool servers.

- `_provider`: OpenAI-compatible chat completions, unary and streamed;
- `_sse`: the server-sent-events decoder;
- `_tools`: HTTP tool calls;
- `_exceptions`: `UpstreamError` and its kinds, each with its retriability;
- `_cost`: price tables and per-session cost.
"""

"""Comparing a candidate's answer with stable's answer to the same mirrored call.

Pure and synchronous except `embedding_cosine`, the one optional network measure. Tool
decisions are compared field by field after canonical JSON, so key order, whitespace and
``1`` versus ``1.0`` never count as a difference; each difference is named by a stable
path (``tool_calls.count``, ``tool_calls[0].name``, ``tool_calls[1].arguments.order_id``,
``tool_calls[0].arguments.items[2]``) that dashboards can group by. The paths name fields,
never their values, so they are safe to record (tool arguments may hold user data).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field
from rapidfuzz import fuzz, utils

SIMILARITY_MEASURE = "token_set_ratio"
EMBEDDING_MEASURE = "embedding_cosine"
DEFAULT_MIN_SIMILARITY = 0.6
DEFAULT_EMBEDDING_TIMEOUT_S = 10.0
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_MAX_EXACT_INT_FLOAT = 2.0**53  # beyond this a float's integer value is not the number it was written as


@dataclass(frozen=True, slots=True)
class ToolDecision:
    """One tool call an answer decided on: the tool's name and its arguments as a JSON string."""

    name: str
    arguments_json: str = "{}"


@dataclass(frozen=True, slots=True)
class Answer:
    """One side's answer to a mirrored call, normalized from whatever transport produced it."""

    text: str = ""
    tool_calls: Sequence[ToolDecision] = ()
    latency_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    ok: bool = True
    error_class: str = ""  # empty when ok


class DivergenceRule(BaseModel):
    """When a compared pair counts as divergent (and so is always judged)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_similarity: float = Field(default=DEFAULT_MIN_SIMILARITY, ge=0.0, le=1.0)
    tools_must_agree: bool = True
    # used only when an embedding similarity is given; None: embeddings never flag a pair
    min_embedding_similarity: float | None = Field(default=None, ge=-1.0, le=1.0)


@dataclass(frozen=True, slots=True)
class Comparison:
    """The measures of one pair; mirrors the comparison fields of ShadowRecord."""

    tools_agree: bool
    differing_fields: tuple[str, ...]
    stable_tool_calls: int
    candidate_tool_calls: int
    text_similarity: float  # in [0, 1]
    similarity_measure: str
    divergent: bool
    reasons: tuple[str, ...]  # why divergent: "tools", "text", "embedding", "error"
    latency_delta_ms: float  # candidate minus stable, for this and the deltas below
    input_tokens_delta: int
    output_tokens_delta: int
    cost_delta_usd: float
    embedding_similarity: float | None = None
    stable_ok: bool = True
    candidate_ok: bool = True


class EmbeddingError(Exception):
    """The embeddings endpoint failed or answered something unusable; `error_class` says how."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class


# --- canonical JSON --------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    """Strict JSON (NaN and Infinity refused, as in RFC 8259); raises ValueError."""
    return json.loads(text, parse_constant=_reject_constant)


def _normalize(value: Any) -> Any:
    # 1 and 1.0 are one number: integral floats become ints (exactly, while the float is exact)
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if value.is_integer() and abs(value) <= _MAX_EXACT_INT_FLOAT:
            return int(value)
        return value
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    return value


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(text: str) -> str:
    """Sorted keys, no whitespace, integral numbers written as integers; invalid JSON is
    returned as its raw string (so two equally broken argument strings still compare equal)."""
    try:
        return _dump(_normalize(_loads(text)))
    except ValueError:
        return text


def arguments_sha256(arguments_json: str) -> str:
    """Hex SHA-256 of the canonical arguments: records an intercepted write without its values."""
    return hashlib.sha256(canonical_json(arguments_json).encode("utf-8")).hexdigest()


# --- tool decisions --------------------------------------------------------------------------


class _Invalid:
    """Stands for arguments that are not JSON; equal only to the same raw string."""

    __slots__ = ("raw",)

    def __init__(self, raw: str) -> None:
        self.raw = raw


def _parsed(arguments_json: str) -> Any:
    try:
        return _normalize(_loads(arguments_json))
    except ValueError:
        return _Invalid(arguments_json)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, _Invalid) or isinstance(b, _Invalid):
        return isinstance(a, _Invalid) and isinstance(b, _Invalid) and a.raw == b.raw
    return _dump(a) == _dump(b)  # through JSON so True != 1 and 1 == 1.0 (already normalized)


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if _PLAIN_KEY.match(key) else f"{path}[{json.dumps(key, ensure_ascii=False)}]"


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            where = _key_path(path, key)
            if key not in a or key not in b:
                out.append(where)  # an added or removed argument
            else:
                _diff(a[key], b[key], where, out)
    elif isinstance(a, list) and isinstance(b, list):
        for i in range(min(len(a), len(b))):
            _diff(a[i], b[i], f"{path}[{i}]", out)
        if len(a) != len(b):
            out.append(f"{path}.count")
    elif not _same(a, b):
        out.append(path)


def _call_diff(i: int, stable: ToolDecision, candidate: ToolDecision, out: list[str]) -> None:
    if stable.name != candidate.name:
        out.append(f"tool_calls[{i}].name")
    a, b = _parsed(stable.arguments_json), _parsed(candidate.arguments_json)
    where = f"tool_calls[{i}].arguments"
    if isinstance(a, dict) and isinstance(b, dict):
        _diff(a, b, where, out)
    elif not _same(a, b):
        out.append(where)  # not both objects: the arguments differ as a whole


def _is_subsequence(short: Sequence[tuple[str, str]], long: Sequence[tuple[str, str]]) -> bool:
    it = iter(long)
    return all(any(item == other for other in it) for item in short)


def tool_differences(stable: Sequence[ToolDecision], candidate: Sequence[ToolDecision]) -> list[str]:
    """The paths at which two tool-call lists differ; empty when they agree.

    When one list is the other with calls added or removed (anywhere), only
    ``tool_calls.count`` is reported: the calls the two share are not differences. Otherwise
    calls are compared position by position, plus ``tool_calls.count`` if the lengths differ.
    """
    out: list[str] = []
    if len(stable) != len(candidate):
        keys_s = [(c.name, canonical_json(c.arguments_json)) for c in stable]
        keys_c = [(c.name, canonical_json(c.arguments_json)) for c in candidate]
        short, long = (keys_s, keys_c) if len(keys_s) < len(keys_c) else (keys_c, keys_s)
        out.append("tool_calls.count")
        if _is_subsequence(short, long):
            return out
    for i in range(min(len(stable), len(candidate))):
        _call_diff(i, stable[i], candidate[i], out)
    return out


# --- text ------------------------------------------------------------------------------------


def text_similarity(a: str, b: str) -> float:
    """Token-set ratio in [0, 1] (rapidfuzz, lower-cased, punctuation stripped).

    Why this measure: it needs no model, is cheap enough for every mirrored call, and ignores
    word order and repeated words, which LLM answers vary freely without changing meaning.
    Its known blind spot: an answer whose words are a subset of the other's scores 1.0, so
    an added preamble or a dropped sentence does not lower it; embeddings or the judge catch
    those. Equal texts, or two without words (tool-only answers), are 1.0; one empty is 0.0.
    """
    if a == b:
        return 1.0
    pa, pb = utils.default_process(a), utils.default_process(b)
    if not pa.strip() and not pb.strip():
        return 1.0  # neither has a word (only whitespace or punctuation)
    return float(fuzz.token_set_ratio(pa, pb)) / 100.0


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine of two vectors; raises ValueError for different lengths or a zero vector."""
    if len(a) != len(b) or not a:
        raise ValueError(f"vectors of lengths {len(a)} and {len(b)}")
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    if norm == 0.0:
        raise ValueError("zero vector")
    return max(-1.0, min(1.0, dot / norm))


def _vectors(body: Any) -> list[list[float]]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list) or len(data) != 2:
        raise EmbeddingError("invalid_response", "expected two embeddings in 'data'")
    ordered = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0)
    out: list[list[float]] = []
    for item in ordered:
        vec = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(vec, list) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in vec
        ):
            raise EmbeddingError("invalid_response", "an embedding is not a list of numbers")
        out.append([float(x) for x in vec])
    return out


async def embedding_cosine(
    a: str,
    b: str,
    *,
    base_url: str,
    model: str,
    api_key: str | None = None,
    timeout_s: float = DEFAULT_EMBEDDING_TIMEOUT_S,
    session: aiohttp.ClientSession | None = None,
) -> float:
    """Cosine similarity of two texts' embeddings from an OpenAI-compatible
    ``POST {base_url}/embeddings``. Raises EmbeddingError (error_class "timeout", "connect",
    "status", "invalid_response") for every failure; the caller counts them."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/embeddings"
    own = session is None
    http = aiohttp.ClientSession() if session is None else session
    try:
        async with http.post(
            url,
            json={"model": model, "input": [a, b]},
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            if resp.status != 200:
                raise EmbeddingError("status", f"embeddings answered HTTP {resp.status}")
            try:
                body = await resp.json(content_type=None)
            except ValueError as exc:
                raise EmbeddingError("invalid_response", "embeddings body is not JSON") from exc
    except TimeoutError as exc:
        raise EmbeddingError("timeout", f"no embeddings answer within {timeout_s:g}s") from exc
    except aiohttp.ClientError as exc:
        raise EmbeddingError("connect", f"embeddings request failed: {type(exc).__name__}") from exc
    finally:
        if own:
            await http.close()
    first, second = _vectors(body)
    try:
        return cosine(first, second)
    except ValueError as exc:
        raise EmbeddingError("invalid_response", str(exc)) from exc


# --- the comparison --------------------------------------------------------------------------


def compare(
    stable: Answer,
    candidate: Answer,
    *,
    divergence: DivergenceRule | None = None,
    embedding_similarity: float | None = None,
) -> Comparison:
    """Compare the candidate's answer with stable's. Divergent when the tools disagree (if the
    rule says they must agree), the text similarity is below the rule's minimum, the embedding
    similarity (when given and the rule has a minimum) is below its minimum, or exactly one
    side errored."""
    rule = divergence if divergence is not None else DivergenceRule()
    differing = tuple(tool_differences(stable.tool_calls, candidate.tool_calls))
    similarity = text_similarity(stable.text, candidate.text)
    reasons: list[str] = []
    if differing and rule.tools_must_agree:
        reasons.append("tools")
    if similarity < rule.min_similarity:
        reasons.append("text")
    if (
        embedding_similarity is not None
        and rule.min_embedding_similarity is not None
        and embedding_similarity < rule.min_embedding_similarity
    ):
        reasons.append("embedding")
    if stable.ok != candidate.ok:
        reasons.append("error")
    return Comparison(
        tools_agree=not differing,
        differing_fields=differing,
        stable_tool_calls=len(stable.tool_calls),
        candidate_tool_calls=len(candidate.tool_calls),
        text_similarity=similarity,
        similarity_measure=SIMILARITY_MEASURE,
        divergent=bool(reasons),
        reasons=tuple(reasons),
        latency_delta_ms=candidate.latency_ms - stable.latency_ms,
        input_tokens_delta=candidate.input_tokens - stable.input_tokens,
        output_tokens_delta=candidate.output_tokens - stable.output_tokens,
        cost_delta_usd=candidate.cost_usd - stable.cost_usd,
        embedding_similarity=embedding_similarity,
        stable_ok=stable.ok,
        candidate_ok=candidate.ok,
    )

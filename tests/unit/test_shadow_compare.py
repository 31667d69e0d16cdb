"""The shadow comparison: canonical JSON, tool decisions field by field, text similarity,
divergence; property tests for the invariants, a loopback server for the embeddings call."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

import sidecar.shadow as shadow
from sidecar.shadow import (
    Answer,
    DivergenceRule,
    EmbeddingError,
    ToolDecision,
    arguments_sha256,
    canonical_json,
    compare,
    embedding_cosine,
    text_similarity,
    tool_differences,
)

keys = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=6)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(max_size=8),
)
json_values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=8
)
arg_objects = st.dictionaries(keys, json_values, min_size=1, max_size=4)
names = st.sampled_from(["lookup_order", "search_orders", "refund", "echo"])
calls = st.lists(st.tuples(names, arg_objects), max_size=4)


def decisions(raw: list[tuple[str, dict[str, Any]]]) -> list[ToolDecision]:
    return [ToolDecision(name, json.dumps(args)) for name, args in raw]


def shuffled_json(value: Any, indent: int | None) -> str:
    """The same JSON with keys in reverse order and different whitespace."""

    def rev(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: rev(v[k]) for k in reversed(list(v))}
        if isinstance(v, list):
            return [rev(x) for x in v]
        return v

    return json.dumps(rev(value), indent=indent, separators=(" ,", " : "))


def test_public_surface_is_pinned() -> None:
    public = {n for n, v in vars(shadow).items() if not n.startswith("_") and not isinstance(v, type(shadow))}
    assert set(shadow.__all__) == public - {"annotations"}


# --- canonical JSON ----------------------------------------------------------------------------


def test_canonical_json_normalizes_keys_whitespace_and_numbers() -> None:
    assert canonical_json('{ "b": 1.0, "a": [1, 2.50, {"z": -0.0}] }') == '{"a":[1,2.5,{"z":0}],"b":1}'
    assert canonical_json('{"a": true}') != canonical_json('{"a": 1}')
    assert canonical_json("not json {") == "not json {"
    assert canonical_json('{"x": NaN}') == '{"x": NaN}'  # not RFC JSON: compared raw
    assert canonical_json('"é"') == '"é"'


@given(arg_objects, st.sampled_from([None, 0, 2]))
def test_canonical_json_ignores_key_order_and_whitespace(args: dict[str, Any], indent: int | None) -> None:
    assert canonical_json(json.dumps(args)) == canonical_json(shuffled_json(args, indent))
    assert arguments_sha256(json.dumps(args)) == arguments_sha256(shuffled_json(args, indent))


def test_arguments_sha256_is_hex_of_canonical_form() -> None:
    digest = arguments_sha256('{"b": 2, "a": 1}')
    assert len(digest) == 64 and digest == arguments_sha256('{"a":1,"b":2.0}')
    assert digest != arguments_sha256('{"a":1,"b":3}')


# --- tool decisions ----------------------------------------------------------------------------


@given(calls, st.text(max_size=40))
def test_identical_answers_agree_fully(raw: list[tuple[str, dict[str, Any]]], text: str) -> None:
    answer = Answer(text=text, tool_calls=decisions(raw), latency_ms=5, input_tokens=3, output_tokens=4)
    result = compare(answer, answer)
    assert result.tools_agree and result.differing_fields == ()
    assert result.text_similarity == 1.0
    assert not result.divergent and result.reasons == ()
    assert result.latency_delta_ms == 0 and result.input_tokens_delta == 0 and result.cost_delta_usd == 0


@given(calls, st.sampled_from([None, 0, 3]))
def test_argument_key_order_and_whitespace_do_not_matter(
    raw: list[tuple[str, dict[str, Any]]], indent: int | None
) -> None:
    stable = decisions(raw)
    candidate = [ToolDecision(name, shuffled_json(args, indent)) for name, args in raw]
    assert tool_differences(stable, candidate) == []


@given(calls.filter(bool), st.data())
def test_a_changed_name_is_the_only_difference(raw: list[tuple[str, dict[str, Any]]], data: Any) -> None:
    i = data.draw(st.integers(0, len(raw) - 1))
    new_name = data.draw(names.filter(lambda n: n != raw[i][0]))
    changed = list(raw)
    changed[i] = (new_name, raw[i][1])
    assert tool_differences(decisions(raw), decisions(changed)) == [f"tool_calls[{i}].name"]


@given(calls.filter(bool), st.data())
def test_a_changed_argument_value_is_the_only_difference(
    raw: list[tuple[str, dict[str, Any]]], data: Any
) -> None:
    i = data.draw(st.integers(0, len(raw) - 1))
    name, args = raw[i]
    key = data.draw(st.sampled_from(sorted(args)))
    new_value = data.draw(st.text(max_size=5).map(lambda s: "new-" + s).filter(lambda v: v != args[key]))
    changed = list(raw)
    changed[i] = (name, {**args, key: new_value})
    diffs = tool_differences(decisions(raw), decisions(changed))
    assert diffs == [f"tool_calls[{i}].arguments.{key}"]


@given(calls.filter(bool), st.data())
def test_an_added_or_removed_argument_is_the_only_difference(
    raw: list[tuple[str, dict[str, Any]]], data: Any
) -> None:
    i = data.draw(st.integers(0, len(raw) - 1))
    name, args = raw[i]
    new_key = data.draw(keys.filter(lambda k: k not in args))
    added = list(raw)
    added[i] = (name, {**args, new_key: 1})
    assert tool_differences(decisions(raw), decisions(added)) == [f"tool_calls[{i}].arguments.{new_key}"]
    assert tool_differences(decisions(added), decisions(raw)) == [f"tool_calls[{i}].arguments.{new_key}"]


@given(calls, st.data())
def test_an_added_or_removed_call_is_only_the_count(raw: list[tuple[str, dict[str, Any]]], data: Any) -> None:
    i = data.draw(st.integers(0, len(raw)))
    extra = data.draw(st.tuples(names, arg_objects))
    more = [*raw[:i], extra, *raw[i:]]
    assert tool_differences(decisions(raw), decisions(more)) == ["tool_calls.count"]
    assert tool_differences(decisions(more), decisions(raw)) == ["tool_calls.count"]
    result = compare(Answer(tool_calls=decisions(raw)), Answer(tool_calls=decisions(more)))
    assert not result.tools_agree and result.divergent and "tools" in result.reasons
    assert (result.stable_tool_calls, result.candidate_tool_calls) == (len(raw), len(raw) + 1)


def test_paths_for_nested_values_lists_and_non_objects() -> None:
    stable = [
        ToolDecision("ship", '{"address": {"city": "Oslo", "zip": "0150"}, "items": [1, 2, 3]}'),
        ToolDecision("echo", "[1, 2]"),
        ToolDecision("echo", "not json"),
    ]
    candidate = [
        ToolDecision("ship", '{"address": {"city": "Bergen", "zip": "0150"}, "items": [1, 5]}'),
        ToolDecision("echo", "[1, 3]"),
        ToolDecision("echo", "not json either"),
    ]
    assert tool_differences(stable, candidate) == [
        "tool_calls[0].arguments.address.city",
        "tool_calls[0].arguments.items[1]",
        "tool_calls[0].arguments.items.count",
        "tool_calls[1].arguments",
        "tool_calls[2].arguments",
    ]
    odd = [ToolDecision("t", '{"a.b": 1, "n": 1}')]
    odd_changed = [ToolDecision("t", '{"a.b": 2, "n": 1.0}')]
    assert tool_differences(odd, odd_changed) == ['tool_calls[0].arguments["a.b"]']
    assert tool_differences([ToolDecision("t", '{"a": true}')], [ToolDecision("t", '{"a": 1}')]) == [
        "tool_calls[0].arguments.a"
    ]


def test_positional_compare_when_calls_are_not_a_subsequence() -> None:
    stable = [ToolDecision("a", "{}"), ToolDecision("b", "{}")]
    candidate = [ToolDecision("c", "{}")]
    assert tool_differences(stable, candidate) == ["tool_calls.count", "tool_calls[0].name"]


# --- text and divergence -----------------------------------------------------------------------


def test_text_similarity_bounds() -> None:
    assert text_similarity("", "") == 1.0
    assert text_similarity("  ", "") == 1.0
    assert text_similarity("hello world", "") == 0.0
    assert text_similarity("Your order shipped.", "your ORDER shipped") == 1.0
    assert text_similarity("shipped order your", "Your order shipped.") == 1.0
    low = text_similarity("Your order shipped on Monday.", "I cannot help with refunds today, sorry.")
    assert 0.0 <= low < 0.6


@given(st.text(max_size=30), st.text(max_size=30))
def test_text_similarity_is_symmetric_and_bounded(a: str, b: str) -> None:
    s = text_similarity(a, b)
    assert 0.0 <= s <= 1.0 and math.isclose(s, text_similarity(b, a))


def test_divergence_rules() -> None:
    stable = Answer(text="Your order 42 shipped on Monday.", latency_ms=100, cost_usd=0.002, output_tokens=7)
    same_tools_other_text = Answer(text="Refunds are not possible, sorry.", latency_ms=150, cost_usd=0.001)
    result = compare(stable, same_tools_other_text)
    assert result.tools_agree and result.divergent and result.reasons == ("text",)
    assert result.similarity_measure == "token_set_ratio"
    assert result.latency_delta_ms == 50 and result.output_tokens_delta == -7
    assert math.isclose(result.cost_delta_usd, -0.001)
    lenient = compare(stable, same_tools_other_text, divergence=DivergenceRule(min_similarity=0.0))
    assert not lenient.divergent
    failed = Answer(ok=False, error_class="timeout")
    assert compare(stable, failed).reasons == ("text", "error")
    assert not compare(failed, failed).divergent  # both failed alike: no divergence
    tools = Answer(tool_calls=[ToolDecision("a", "{}")])
    other = Answer(tool_calls=[ToolDecision("b", "{}")])
    assert compare(tools, other, divergence=DivergenceRule(tools_must_agree=False)).divergent is False
    rule = DivergenceRule(min_embedding_similarity=0.8)
    assert compare(stable, stable, divergence=rule, embedding_similarity=0.5).reasons == ("embedding",)
    assert compare(stable, stable, embedding_similarity=0.5).embedding_similarity == 0.5
    with pytest.raises(ValueError, match="min_similarity"):
        DivergenceRule(min_similarity=1.5)
    with pytest.raises(ValueError, match="extra"):
        DivergenceRule(threshold=0.5)  # type: ignore[call-arg]


# --- embeddings through a real loopback server ------------------------------------------------


@pytest.fixture
async def embeddings() -> AsyncIterator[tuple[str, list[Any]]]:
    seen: list[Any] = []
    mode: dict[str, Any] = {"status": 200, "vectors": [[1.0, 0.0], [1.0, 1.0]]}

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Authorization"), await request.json()))
        if mode["status"] != 200:
            return web.json_response({"error": {"message": "nope"}}, status=mode["status"])
        data = [{"index": i, "embedding": v, "object": "embedding"} for i, v in enumerate(mode["vectors"])]
        return web.json_response({"object": "list", "data": list(reversed(data))})

    app = web.Application()
    app.router.add_post("/v1/embeddings", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    seen.append(mode)
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        await runner.cleanup()


async def test_embedding_cosine_against_a_loopback_server(embeddings: tuple[str, list[Any]]) -> None:
    base_url, seen = embeddings
    mode = seen.pop(0)
    value = await embedding_cosine("a", "b", base_url=base_url, model="emb", api_key="sk-test")
    assert math.isclose(value, 1 / math.sqrt(2))
    auth, body = seen[-1]
    assert auth == "Bearer sk-test" and body == {"model": "emb", "input": ["a", "b"]}
    mode["vectors"] = [[0.0, 0.0], [1.0, 1.0]]
    with pytest.raises(EmbeddingError) as bad:
        await embedding_cosine("a", "b", base_url=base_url, model="emb")
    assert bad.value.error_class == "invalid_response"
    mode["status"] = 500
    with pytest.raises(EmbeddingError) as failed:
        await embedding_cosine("a", "b", base_url=base_url, model="emb")
    assert failed.value.error_class == "status"


async def test_embedding_cosine_connect_error_is_classified() -> None:
    from devstack.simprovider import refused_base_url

    with pytest.raises(EmbeddingError) as exc:
        await embedding_cosine("a", "b", base_url=refused_base_url(), model="emb", timeout_s=2)
    assert exc.value.error_class == "connect"

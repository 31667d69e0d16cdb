"""The simulated provider's shadow-mode models on a real loopback port: the judge model and the
divergent candidates, through the official `openai` client; then the comparison and the
`Judge` with its default completion client end to end against them."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from devstack.simprovider import Fault, ModelBehavior, SimConfigError, SimProvider, load_sim_config
from sidecar.shadow import (
    Answer,
    Judge,
    JudgeConfig,
    ToolDecision,
    build_pair_prompt,
    build_single_prompt,
    compare,
)

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look up an order",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}},
        },
    }
]
QUESTION: list[Any] = [{"role": "user", "content": "Where is my order? It was due on Monday."}]
TOOL_COMMAND: list[Any] = [{"role": "user", "content": '/tool lookup_order {"order_id": "A-42"}'}]
KEY_ENV = "OUTRIDER_TEST_JUDGE_KEY"


@pytest.fixture
async def sim() -> AsyncIterator[SimProvider]:
    async with SimProvider(api_key="sk-sim", seed=3) as provider:  # the default models
        yield provider


@pytest.fixture
async def client(sim: SimProvider) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=sim.base_url, api_key="sk-sim", max_retries=0) as c:
        yield c


async def answer_of(client: AsyncOpenAI, model: str, messages: list[Any], **kwargs: Any) -> Answer:
    resp = await client.chat.completions.create(model=model, messages=messages, **kwargs)
    message = resp.choices[0].message
    calls = [ToolDecision(c.function.name, c.function.arguments) for c in message.tool_calls or []]
    usage = resp.usage
    assert usage is not None
    return Answer(
        text=message.content or "",
        tool_calls=calls,
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
    )


def judge_config(sim: SimProvider, **changes: Any) -> JudgeConfig:
    fields: dict[str, Any] = {
        "base_url": sim.base_url,
        "model": "sim-judge",
        "provider": "sim",
        "api_key_env": KEY_ENV,
        "input_usd_per_mtok": 1.0,
        "output_usd_per_mtok": 2.0,
        "timeout_s": 5.0,
    }
    return JudgeConfig(**(fields | changes))


# --- the judge model ---------------------------------------------------------------------------


async def test_sim_judge_scores_a_pair_by_the_model_each_answer_names(client: AsyncOpenAI) -> None:
    stable = "Simulated reply from sim-fast to: Where is my order?"
    candidate = "Simulated reply from sim-divergent: sorry, I cannot confirm anything."
    for seed in range(4):
        prompt = build_pair_prompt(QUESTION, candidate, stable, rng=random.Random(seed))
        resp = await client.chat.completions.create(model="sim-judge", messages=prompt.messages)  # type: ignore[arg-type]
        verdict = json.loads(resp.choices[0].message.content or "")
        if prompt.candidate_is_a:
            assert verdict == {"score_a": 0.3, "score_b": 0.8, "preference": "B"}
        else:
            assert verdict == {"score_a": 0.8, "score_b": 0.3, "preference": "A"}


async def test_sim_judge_single_tie_default_and_plain_prompts(client: AsyncOpenAI, sim: SimProvider) -> None:
    single = build_single_prompt(QUESTION, "Simulated reply from sim-fast to: hi")
    resp = await client.chat.completions.create(model="sim-judge", messages=single)  # type: ignore[arg-type]
    assert json.loads(resp.choices[0].message.content or "") == {"score": 0.8}
    tie = build_pair_prompt(QUESTION, "an answer", "another", rng=random.Random(0))
    resp = await client.chat.completions.create(model="sim-judge", messages=tie.messages)  # type: ignore[arg-type]
    assert json.loads(resp.choices[0].message.content or "") == {
        "score_a": 0.5,
        "score_b": 0.5,
        "preference": "tie",
    }
    plain = await client.chat.completions.create(model="sim-judge", messages=QUESTION)
    assert (plain.choices[0].message.content or "").startswith("Simulated reply from sim-judge to:")
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-sim"}) as http:
        body = {"judge_scores": {"sim-fast": 0.25}, "judge_default_score": 0.1}
        async with http.patch(f"{sim.base_url.removesuffix('/v1')}/_sim/models/sim-judge", json=body) as r:
            assert r.status == 200
    resp = await client.chat.completions.create(model="sim-judge", messages=single)  # type: ignore[arg-type]
    assert json.loads(resp.choices[0].message.content or "") == {"score": 0.25}
    assert sim.models["sim-judge"].judge and sim.models["sim-judge"].judge_default_score == 0.1


# --- divergent candidates ----------------------------------------------------------------------


async def test_sim_divergent_renames_tools_and_rewords_text(client: AsyncOpenAI) -> None:
    stable = await answer_of(client, "sim-fast", TOOL_COMMAND, tools=TOOLS)
    candidate = await answer_of(client, "sim-divergent", TOOL_COMMAND, tools=TOOLS)
    assert stable.tool_calls == [ToolDecision("lookup_order", '{"order_id": "A-42"}')]
    assert candidate.tool_calls == [ToolDecision("search_orders", '{"order_id": "A-42"}')]
    tools = compare(stable, candidate)
    assert tools.differing_fields == ("tool_calls[0].name",) and tools.divergent

    stable_text = await answer_of(client, "sim-fast", QUESTION)
    candidate_text = await answer_of(client, "sim-divergent", QUESTION)
    assert candidate_text.text.startswith("Simulated reply from sim-divergent:")
    text = compare(stable_text, candidate_text)
    assert text.tools_agree and text.text_similarity < 0.6 and text.reasons == ("text",)
    assert not compare(stable_text, await answer_of(client, "sim-fast", QUESTION)).divergent

    stream = await client.chat.completions.create(
        model="sim-divergent", messages=TOOL_COMMAND, tools=TOOLS, stream=True
    )
    names = []
    async for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if call.function is not None and call.function.name:
                names.append(call.function.name)
    assert names == ["search_orders"]


async def test_candidate_behaviors_change_at_run_time(client: AsyncOpenAI, sim: SimProvider) -> None:
    origin = sim.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as http:
        body = {"ignore_tools": True, "reply_prefix": "Sure thing! "}
        async with http.put(f"{origin}/_sim/models/sim-ignore", json=body) as r:
            assert r.status == 200
            assert (await r.json())["behavior"]["ignore_tools"] is True
        for bad, where in [
            ({"reply_style": "loud"}, "reply_style"),
            ({"judge_scores": {"sim-fast": 2}}, "judge_scores.sim-fast"),
            ({"tool_rename": {"lookup_order": ""}}, "tool_rename.lookup_order"),
            ({"ignore_tools": "yes"}, "ignore_tools"),
        ]:
            async with http.patch(f"{origin}/_sim/models/sim-ignore", json=bad) as r:
                assert r.status == 400
                assert (await r.json())["error"]["param"] == where
    answer = await answer_of(client, "sim-ignore", TOOL_COMMAND, tools=TOOLS)
    assert answer.tool_calls == [] and answer.text.startswith("Sure thing! Simulated reply from sim-ignore")
    assert compare(
        await answer_of(client, "sim-fast", TOOL_COMMAND, tools=TOOLS), answer
    ).differing_fields == ("tool_calls.count",)


def test_sim_config_file_takes_the_shadow_fields(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(
        "models:\n"
        "  judge: {judge: true, judge_scores: {sim-fast: 0.9}, judge_default_score: 0.2}\n"
        "  cand: {tool_rename: {lookup_order: search_orders}, reply_style: reworded, reply_prefix: 'Hi. '}\n"
    )
    models, _ = load_sim_config(path)
    assert models["judge"] == ModelBehavior(
        judge=True, judge_scores={"sim-fast": 0.9}, judge_default_score=0.2
    )
    assert models["cand"].tool_rename == {"lookup_order": "search_orders"}
    path.write_text("models:\n  judge: {judge_scores: {sim-fast: high}}\n")
    with pytest.raises(SimConfigError, match=r"models\.judge\.judge_scores\.sim-fast"):
        load_sim_config(path)


# --- end to end: compare, then judge with the default completion client ------------------------


async def test_judge_end_to_end_against_the_sim_judge(
    client: AsyncOpenAI, sim: SimProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-sim")
    stable = await answer_of(client, "sim-fast", QUESTION)
    candidate = await answer_of(client, "sim-divergent", QUESTION)
    comparison = compare(stable, candidate)
    assert comparison.divergent
    async with Judge(judge_config(sim), rng=random.Random(11)) as judge:
        assert judge.config.should_judge_pair(comparison.divergent, random.Random(0))
        results = [
            await judge.judge_pair(QUESTION, candidate, stable, pair_id=f"p{i}", divergent=True)
            for i in range(4)
        ]
        single = await judge.judge_single(QUESTION, stable)
    for i, result in enumerate(results):
        assert result is not None and result.ok and result.parsed, result
        assert (result.score, result.stable_score, result.preference) == (0.3, 0.8, "stable")
        assert (result.kind, result.judge, result.pair_id, result.divergent) == (
            "pair",
            "sim/sim-judge",
            f"p{i}",
            True,
        )
        assert result.cost_usd > 0 and result.latency_ms > 0
    assert single is not None and single.parsed and single.score == 0.8 and single.kind == "single"
    assert judge.stats.calls == 5 and judge.stats.parsed == 5
    sent = [r for r in sim.received if r.body and r.body.get("model") == "sim-judge"]
    assert len(sent) == 5 and all(r.headers["Authorization"] == "Bearer sk-sim" for r in sent)
    assert all(r.body["temperature"] == 0 for r in sent)
    for r in sent:  # blind on the wire too
        assert "sim-divergent" not in json.dumps(r.body["messages"][0])


async def test_judge_default_client_errors_are_classified(
    sim: SimProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    async with Judge(judge_config(sim)) as judge:  # no key: the sim answers 401
        result = await judge.judge_single(QUESTION, "x")
    assert result is not None and (result.ok, result.error_class) == (False, "status")

    monkeypatch.setenv(KEY_ENV, "sk-sim")
    sim.script("sim-judge", Fault(kind="hang", delay_s=5.0, times=1))
    async with Judge(judge_config(sim, timeout_s=0.2)) as judge:
        timed_out = await judge.judge_single(QUESTION, "x")
        assert timed_out is not None and timed_out.error_class == "timeout"
        assert judge.stats.errors["timeout"] == 1
    sim.script("sim-judge", Fault(kind="malformed_json", times=1))
    async with Judge(judge_config(sim)) as judge:
        bad = await judge.judge_single(QUESTION, "x")
    assert bad is not None and bad.error_class == "invalid_response"
    async with Judge(judge_config(sim, base_url=sim.refused_url())) as judge:
        refused = await judge.judge_single(QUESTION, "x")
    assert refused is not None and refused.error_class == "connect"

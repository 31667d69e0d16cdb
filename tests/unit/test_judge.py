"""The blind judge: prompts that reveal nothing, verdict parsing, un-shuffling, bounded
concurrency, the budget, timeouts and errors, sampling, the owned-task lifecycle."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

import pytest
from pydantic import ValidationError

from sidecar.shadow import (
    DEFAULT_RUBRIC,
    Answer,
    Completion,
    Judge,
    JudgeCallError,
    JudgeConfig,
    JudgeResult,
    OpenAIChatCompletion,
    ToolDecision,
    build_pair_prompt,
    build_single_prompt,
    parse_pair_verdict,
    parse_single_verdict,
)

CONFIG = JudgeConfig(base_url="http://127.0.0.1:9/v1", model="judge-model")
SECRET_SYSTEM = "You are support agent v-3f9a2c1d, version support-v7, canary, model gpt-4o-2024."
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": SECRET_SYSTEM},
    {"role": "user", "content": "Where is order 42?"},
]
IDENTIFYING = ["v-3f9a2c1d", "support-v7", "gpt-4o", "canary", "stable", "candidate", "shadow", "pair-77"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Scripted:
    """A fake judge client: records prompts, answers with a function of the prompt."""

    def __init__(self, answer: Any = '{"score": 0.5}', cost: float = 0.0) -> None:
        self.prompts: list[list[dict[str, str]]] = []
        self.answer = answer
        self.cost = cost

    async def __call__(self, messages: list[dict[str, str]]) -> Completion:
        self.prompts.append(messages)
        text = self.answer(messages) if callable(self.answer) else self.answer
        return Completion(text, 10, 5, self.cost)


def section(prompt: str, label: str) -> str:
    match = re.search(rf"\[{label}\]\n(.*?)\n\[End of {label}\]", prompt, re.DOTALL)
    assert match, label
    return match.group(1)


def prefers_good(messages: list[dict[str, str]]) -> str:
    """A judge that gives 0.9 to the answer containing GOOD, 0.2 to the other."""
    user = messages[-1]["content"]
    a_good = "GOOD" in section(user, "Answer A")
    return json.dumps(
        {
            "score_a": 0.9 if a_good else 0.2,
            "score_b": 0.2 if a_good else 0.9,
            "preference": "A" if a_good else "B",
        }
    )


# --- blindness ---------------------------------------------------------------------------------


async def test_judge_prompt_is_blind() -> None:
    fake = Scripted(prefers_good)
    judge = Judge(CONFIG, fake, rng=random.Random(1))
    candidate = Answer(text="GOOD: order 42 shipped", tool_calls=[ToolDecision("lookup_order", '{"id": 42}')])
    await judge.judge_pair(CONVERSATION, candidate, "order 42 is late", pair_id="pair-77", divergent=True)
    await judge.judge_single(CONVERSATION, "order 42 shipped")
    for prompt in fake.prompts:
        text = "\n".join(m["content"] for m in prompt).lower()
        for word in IDENTIFYING:
            assert word.lower() not in text, word
        assert "where is order 42?" in text  # the user's conversation is shown
    pair_user = fake.prompts[0][-1]["content"]
    assert "lookup_order" in pair_user and "Answer A" in pair_user and "Answer B" in pair_user
    assert "[Answer]" in fake.prompts[1][-1]["content"] and "Answer A" not in fake.prompts[1][-1]["content"]
    assert fake.prompts[0][0] == {"role": "system", "content": DEFAULT_RUBRIC}


def test_order_flips_across_seeds_and_is_recorded() -> None:
    seen = set()
    for seed in range(20):
        prompt = build_pair_prompt(CONVERSATION, "CAND", "STAB", rng=random.Random(seed))
        user = prompt.messages[-1]["content"]
        assert section(user, "Answer A") == ("CAND" if prompt.candidate_is_a else "STAB")
        assert section(user, "Answer B") == ("STAB" if prompt.candidate_is_a else "CAND")
        seen.add(prompt.candidate_is_a)
    assert seen == {True, False}


@pytest.mark.parametrize("seed", range(6))
async def test_verdict_is_unshuffled_to_candidate_and_stable(seed: int) -> None:
    judge = Judge(CONFIG, Scripted(prefers_good), rng=random.Random(seed), clock=Clock())
    better = await judge.judge_pair(CONVERSATION, "GOOD answer", "weak answer", pair_id="p1")
    worse = await judge.judge_pair(CONVERSATION, "weak answer", "GOOD answer", pair_id="p2")
    assert better == JudgeResult(
        kind="pair",
        judge="openai/judge-model",
        parsed=True,
        score=0.9,
        stable_score=0.2,
        preference="candidate",
        pair_id="p1",
    )
    assert worse is not None and (worse.score, worse.stable_score, worse.preference) == (0.2, 0.9, "stable")


def test_single_prompt_has_one_answer() -> None:
    messages = build_single_prompt(CONVERSATION, Answer(ok=False, error_class="timeout"), rubric="R")
    assert messages[0] == {"role": "system", "content": "R"}
    assert "(no answer: the assistant failed)" in messages[1]["content"]
    assert "timeout" not in messages[1]["content"]


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"score_a": 0.8, "score_b": 0.3, "preference": "A"}', (0.8, 0.3, "A")),
        ('```json\n{"score_a": 1, "score_b": 0, "preference": "b"}\n```', (1.0, 0.0, "B")),
        (
            'Here is my verdict: {"score_a": 0.5, "score_b": 0.5, "preference": "Tie"}. Thanks!',
            (0.5, 0.5, "tie"),
        ),
        ('{"note": "x"} then {"score_a": 0.1, "score_b": 0.2, "preference": "B"}', (0.1, 0.2, "B")),
        ("Answer A is better.", None),
        ("", None),
        ('{"score_a": 1.2, "score_b": 0.3, "preference": "A"}', None),
        ('{"score_a": -0.1, "score_b": 0.3, "preference": "A"}', None),
        ('{"score_a": 0.8, "score_b": 0.3}', None),
        ('{"score_a": 0.8, "preference": "A"}', None),
        ('{"score_a": true, "score_b": 0.3, "preference": "A"}', None),
        ('{"score_a": "0.8", "score_b": 0.3, "preference": "A"}', None),
        ('{"score_a": 0.8, "score_b": 0.3, "preference": "C"}', None),
        ('{"score_a": 0.8, "score_b": 0.3, "preference": "A"', None),
    ],
)
def test_parse_pair_verdict(text: str, expected: tuple[float, float, str] | None) -> None:
    assert parse_pair_verdict(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"score": 0.7}', 0.7),
        ('```\n{"score": 0}\n```', 0.0),
        ('I rate it {"score": 1}.', 1.0),
        ('{"score": 1.01}', None),
        ('{"score": NaN}', None),
        ('{"rating": 0.5}', None),
        ("0.7", None),
        ("garbage {", None),
    ],
)
def test_parse_single_verdict(text: str, expected: float | None) -> None:
    assert parse_single_verdict(text) == expected


def test_parsing_is_bounded() -> None:
    assert parse_pair_verdict("{" * 200_000) is None
    assert parse_single_verdict("x" * 20_000 + '{"score": 0.5}') is None  # past the bound: not read
    assert parse_single_verdict("{ " * 100 + '{"score": 0.5}') is None  # past the tried starts


async def test_unparsed_answers_are_counted_not_guessed() -> None:
    judge = Judge(CONFIG, Scripted("Answer A, clearly.", cost=0.001))
    result = await judge.judge_pair(CONVERSATION, "a", "b")
    assert result is not None and result.ok and not result.parsed
    assert (result.score, result.stable_score, result.preference) == (0.0, 0.0, "")
    assert result.cost_usd == 0.001
    assert judge.stats.unparsed == 1 and judge.stats.parsed == 0 and judge.stats.calls == 1


# --- concurrency, budget, errors -----------------------------------------------------------------


async def test_concurrency_is_bounded() -> None:
    release = asyncio.Event()
    active = peak = 0

    async def slow(messages: list[dict[str, str]]) -> Completion:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await release.wait()
        active -= 1
        return Completion('{"score": 0.5}')

    judge = Judge(CONFIG.model_copy(update={"max_calls_per_minute": None}), slow)
    calls = [asyncio.create_task(judge.judge_single(CONVERSATION, "x")) for _ in range(6)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert peak == 2 and judge.pending == 6
    release.set()
    results = await asyncio.gather(*calls)
    assert all(r is not None and r.parsed for r in results) and peak == 2 and judge.pending == 0


async def test_admission_beyond_max_pending_is_refused() -> None:
    release = asyncio.Event()

    async def slow(messages: list[dict[str, str]]) -> Completion:
        await release.wait()
        return Completion('{"score": 0.5}')

    got: list[JudgeResult] = []
    config = CONFIG.model_copy(update={"max_pending": 3})
    judge = Judge(config, slow, on_result=got.append)
    accepted = [judge.submit_single(CONVERSATION, "x") for _ in range(5)]
    assert accepted == [True, True, True, False, False]
    assert judge.stats.refused["busy"] == 2
    release.set()
    await judge.aclose()
    assert len(got) == 3 and all(r.kind == "single" and r.score == 0.5 for r in got)
    assert judge.submit_single(CONVERSATION, "x") is False and judge.stats.refused["closed"] == 1
    assert await judge.judge_single(CONVERSATION, "x") is None


async def test_calls_per_minute_budget_refuses_and_recovers() -> None:
    clock = Clock()
    judge = Judge(CONFIG.model_copy(update={"max_calls_per_minute": 2}), Scripted(), clock=clock)
    assert await judge.judge_single(CONVERSATION, "x") is not None
    clock.now += 30
    assert await judge.judge_single(CONVERSATION, "x") is not None
    assert await judge.judge_single(CONVERSATION, "x") is None
    assert judge.stats.refused["budget"] == 1 and judge.stats.calls == 2
    clock.now += 31  # the first call left the minute
    assert await judge.judge_single(CONVERSATION, "x") is not None
    assert await judge.judge_single(CONVERSATION, "x") is None


async def test_usd_per_hour_budget_refuses_and_recovers() -> None:
    clock = Clock()
    config = CONFIG.model_copy(update={"max_calls_per_minute": None, "max_usd_per_hour": 0.01})
    judge = Judge(config, Scripted(cost=0.006), clock=clock)
    assert await judge.judge_single(CONVERSATION, "x") is not None
    assert await judge.judge_single(CONVERSATION, "x") is not None  # 0.006 < 0.01 still
    assert await judge.judge_single(CONVERSATION, "x") is None
    assert judge.stats.refused["budget"] == 1 and judge.stats.cost_usd == pytest.approx(0.012)
    clock.now += 3601
    assert await judge.judge_single(CONVERSATION, "x") is not None


async def test_timeout_and_failures_are_results_with_an_error_class() -> None:
    async def hang(messages: list[dict[str, str]]) -> Completion:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    async def refuse(messages: list[dict[str, str]]) -> Completion:
        raise JudgeCallError("status", "HTTP 503")

    async def broken(messages: list[dict[str, str]]) -> Completion:
        raise RuntimeError("bug in a plugged client")

    config = CONFIG.model_copy(update={"timeout_s": 0.05})
    timed_out = await Judge(config, hang).judge_pair(CONVERSATION, "a", "b", pair_id="p", divergent=True)
    assert timed_out is not None and not timed_out.ok and not timed_out.parsed
    assert (timed_out.error_class, timed_out.pair_id, timed_out.divergent) == ("timeout", "p", True)
    judge = Judge(config, refuse, clock=Clock())
    assert (await judge.judge_single(CONVERSATION, "a")) == JudgeResult(
        kind="single", judge="openai/judge-model", parsed=False, ok=False, error_class="status"
    )
    assert judge.stats.errors["status"] == 1 and judge.stats.calls == 1
    failed = await Judge(config, broken).judge_single(CONVERSATION, "a")
    assert failed is not None and failed.error_class == "error"


async def test_aclose_cancels_calls_that_outlive_the_drain() -> None:
    started = asyncio.Event()

    async def hang(messages: list[dict[str, str]]) -> Completion:
        started.set()
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    got: list[JudgeResult] = []
    judge = Judge(CONFIG, hang, on_result=got.append)
    assert judge.submit_pair(CONVERSATION, "a", "b")
    await started.wait()
    await judge.aclose(timeout_s=0.01)
    await judge.aclose()  # idempotent
    assert got == [] and judge.pending == 0


async def test_a_failing_result_callback_does_not_break_the_judge(caplog: pytest.LogCaptureFixture) -> None:
    def explode(result: JudgeResult) -> None:
        raise RuntimeError("recorder down")

    async with Judge(CONFIG, Scripted(), on_result=explode) as judge:
        assert judge.submit_single(CONVERSATION, "x")
    assert "judge result callback failed" in caplog.text
    assert "x" not in [r.message for r in caplog.records]


# --- sampling and config -----------------------------------------------------------------------


def test_sampling_helpers() -> None:
    rng = random.Random(3)
    assert all(CONFIG.should_judge_pair(True, rng) for _ in range(100))
    share = sum(CONFIG.should_judge_pair(False, rng) for _ in range(20_000)) / 20_000
    assert 0.09 < share < 0.11
    config = JudgeConfig(
        base_url="http://x/v1", model="m", evaluation_share=0.0, evaluation_share_by_role={"canary": 1.0}
    )
    assert all(config.should_evaluate("canary", rng) for _ in range(100))
    assert not any(config.should_evaluate("stable", rng) for _ in range(100))
    default = sum(CONFIG.should_evaluate("stable", rng) for _ in range(50_000)) / 50_000
    assert 0.007 < default < 0.013


def test_config_is_validated_and_holds_no_key() -> None:
    assert (CONFIG.pair_sample, CONFIG.evaluation_share, CONFIG.max_concurrency) == (0.10, 0.01, 2)
    with pytest.raises(ValidationError, match="api_key"):
        JudgeConfig(base_url="http://x/v1", model="m", api_key="sk-nope")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="canary"):
        JudgeConfig(base_url="http://x/v1", model="m", evaluation_share_by_role={"canary": 1.5})
    with pytest.raises(ValidationError, match="max_concurrency"):
        JudgeConfig(base_url="http://x/v1", model="m", max_concurrency=0)
    config = JudgeConfig(base_url="http://x/v1", model="m", api_key_env="JUDGE_KEY")
    client = OpenAIChatCompletion.from_config(config, env={"JUDGE_KEY": "sk-from-env"})
    assert client._headers == {"Authorization": "Bearer sk-from-env"}
    assert OpenAIChatCompletion.from_config(config, env={})._headers == {}

"""LLM-as-judge, blind: a judge model scores a mirrored pair or one production answer.

Blindness: the judge sees the user's conversation and the answers' content, nothing else:
no version id or name, no rollout role, no agent model name, and the pair in a random
order ("Answer A", "Answer B"). System and developer messages are left out of the prompt
because they are the version's own prompt and would tell the versions apart. Redaction is
the caller's job: pass text that already went through the output guards' redaction.

The judge call itself is injected (`CompleteFn`), so the sidecar can plug its own upstream
client; `OpenAIChatCompletion` is a small default for any OpenAI-compatible provider.
An answer the judge gives that cannot be parsed is a result with ``parsed=False``:
counted, never guessed. Prompt and answer text are never logged.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import aiohttp
from pydantic import BaseModel, ConfigDict, Field

from ._compare import Answer
from ._judge_prompt import (
    DEFAULT_RUBRIC,
    build_pair_prompt,
    build_single_prompt,
    parse_pair_verdict,
    parse_single_verdict,
)

logger = logging.getLogger(__name__)

PAIR_DEFAULT_SAMPLE = 0.10
EVALUATION_DEFAULT_SHARE = 0.01
DEFAULT_MAX_CONCURRENCY = 2
DEFAULT_MAX_PENDING = 64
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CLOSE_TIMEOUT_S = 5.0

Clock = Callable[[], float]
Kind = Literal["pair", "single"]


class JudgeConfig(BaseModel):
    """The judge's settings; the API key is named by an environment variable, never held here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(min_length=1)
    model: str = Field(min_length=1)
    provider: str = "openai"  # only for the recorded judge name "<provider>/<model>"
    api_key_env: str | None = None
    rubric: str = Field(default=DEFAULT_RUBRIC, min_length=1)
    pair_sample: float = Field(default=PAIR_DEFAULT_SAMPLE, ge=0.0, le=1.0)
    evaluation_share: float = Field(default=EVALUATION_DEFAULT_SHARE, ge=0.0, le=1.0)
    # e.g. {"canary": 0.15}: a small canary is sampled more so its evidence grows as fast
    evaluation_share_by_role: dict[str, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(default_factory=dict)
    max_concurrency: int = Field(default=DEFAULT_MAX_CONCURRENCY, ge=1)
    max_pending: int = Field(default=DEFAULT_MAX_PENDING, ge=1)  # running + waiting for a slot
    max_calls_per_minute: int | None = Field(default=60, ge=0)
    max_usd_per_hour: float | None = Field(default=None, ge=0.0)
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0.0)
    input_usd_per_mtok: float = Field(default=0.0, ge=0.0)  # prices the default completion uses
    output_usd_per_mtok: float = Field(default=0.0, ge=0.0)

    @property
    def judge_name(self) -> str:
        return f"{self.provider}/{self.model}"

    def should_judge_pair(self, divergent: bool, rng: random.Random) -> bool:
        """Divergent pairs always; the others with probability `pair_sample`."""
        return divergent or rng.random() < self.pair_sample

    def should_evaluate(self, role: str, rng: random.Random) -> bool:
        """Continuous evaluation of one production answer, at the role's share."""
        return rng.random() < self.evaluation_share_by_role.get(role, self.evaluation_share)


# --- the judge call --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


CompleteFn = Callable[[list[dict[str, str]]], Awaitable[Completion]]


class JudgeCallError(Exception):
    """The judge call failed; `error_class` ("timeout", "connect", "status", "invalid_response")."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(f"{error_class}: {message}")
        self.error_class = error_class


class OpenAIChatCompletion:
    """A `CompleteFn` that POSTs ``{base_url}/chat/completions`` (temperature 0) with aiohttp."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        input_usd_per_mtok: float = 0.0,
        output_usd_per_mtok: float = 0.0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._prices = (input_usd_per_mtok, output_usd_per_mtok)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = session
        self._own = session is None

    @classmethod
    def from_config(cls, config: JudgeConfig, env: Mapping[str, str] | None = None) -> OpenAIChatCompletion:
        env = os.environ if env is None else env
        key = env.get(config.api_key_env) if config.api_key_env else None
        return cls(
            config.base_url,
            config.model,
            api_key=key or None,
            input_usd_per_mtok=config.input_usd_per_mtok,
            output_usd_per_mtok=config.output_usd_per_mtok,
            timeout_s=config.timeout_s,
        )

    async def __call__(self, messages: list[dict[str, str]]) -> Completion:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        body = {"model": self._model, "messages": messages, "temperature": 0}
        try:
            async with self._session.post(
                self._url, json=body, headers=self._headers, timeout=self._timeout
            ) as resp:
                if resp.status != 200:
                    raise JudgeCallError("status", f"judge answered HTTP {resp.status}")
                try:
                    data = await resp.json(content_type=None)
                except ValueError as exc:
                    raise JudgeCallError("invalid_response", "judge body is not JSON") from exc
        except TimeoutError as exc:
            raise JudgeCallError("timeout", "no judge answer in time") from exc
        except aiohttp.ClientError as exc:
            raise JudgeCallError("connect", f"judge request failed: {type(exc).__name__}") from exc
        try:
            text = data["choices"][0]["message"]["content"] or ""
            usage = data.get("usage") or {}
            tokens_in, tokens_out = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise JudgeCallError("invalid_response", "not a chat completion") from exc
        cost = (tokens_in * self._prices[0] + tokens_out * self._prices[1]) / 1e6
        return Completion(str(text), tokens_in, tokens_out, cost)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._own:
            await session.close()


# --- budget and results ----------------------------------------------------------------------


class JudgeBudget:
    """Sliding-window limits on judge calls per minute and judge spend per hour.

    A call's cost is known only when it returns, so the spend limit can be passed by the
    calls already in flight when it is reached: at most `max_concurrency` calls' cost.
    """

    def __init__(
        self, max_calls_per_minute: int | None, max_usd_per_hour: float | None, clock: Clock
    ) -> None:
        self._max_calls = max_calls_per_minute
        self._max_usd = max_usd_per_hour
        self._clock = clock
        self._calls: collections.deque[float] = collections.deque()
        self._spend: collections.deque[tuple[float, float]] = collections.deque()
        self._spent = 0.0

    def _expire(self, now: float) -> None:
        while self._calls and self._calls[0] <= now - 60.0:
            self._calls.popleft()
        while self._spend and self._spend[0][0] <= now - 3600.0:
            self._spent -= self._spend.popleft()[1]

    def try_acquire(self) -> bool:
        """Take one call from the budget; False (nothing taken) when a limit is reached."""
        now = self._clock()
        self._expire(now)
        if self._max_calls is not None and len(self._calls) >= self._max_calls:
            return False
        if self._max_usd is not None and self._spent >= self._max_usd:
            return False
        self._calls.append(now)  # bounded: at most max_calls entries live at once
        return True

    def spend(self, usd: float) -> None:
        if usd > 0 and self._max_usd is not None:
            self._spend.append((self._clock(), usd))
            self._spent += usd


@dataclass(frozen=True, slots=True)
class JudgeResult:
    """One verdict; mirrors JudgeRecord. `score` is the candidate's (or the single answer's)."""

    kind: Kind
    judge: str
    parsed: bool
    score: float = 0.0
    stable_score: float = 0.0
    preference: str = ""  # pair: "candidate", "stable" or "tie"
    pair_id: str = ""
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    ok: bool = True
    error_class: str = ""
    divergent: bool = False


@dataclass
class JudgeStats:
    calls: int = 0
    parsed: int = 0
    unparsed: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)  # budget, busy, closed
    cost_usd: float = 0.0


_PREFERENCE = {
    (True, "A"): "candidate",
    (True, "B"): "stable",
    (False, "A"): "stable",
    (False, "B"): "candidate",
}


class Judge:
    """Runs judge calls with at most `max_concurrency` in flight and `max_pending` admitted.

    `judge_pair`/`judge_single` await the verdict; `submit_pair`/`submit_single` run it in a
    task the judge owns and hand the result to `on_result`. A call refused (closed, too many
    pending, budget exhausted) returns None or False and is counted in `stats.refused`; it
    never waits for room. A failing judge call is a result with ``ok=False``, never an
    exception. `aclose()` stops admitting, lets owned tasks finish for a while, then cancels.
    """

    def __init__(
        self,
        config: JudgeConfig,
        complete: CompleteFn | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        on_result: Callable[[JudgeResult], None] | None = None,
    ) -> None:
        self.config = config
        self._default: OpenAIChatCompletion | None = None
        if complete is None:  # the judge owns (and closes) the default client
            complete = self._default = OpenAIChatCompletion.from_config(config)
        self._complete = complete
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._on_result = on_result
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._pending = 0
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.budget = JudgeBudget(config.max_calls_per_minute, config.max_usd_per_hour, clock)
        self.stats = JudgeStats()

    @property
    def pending(self) -> int:
        return self._pending

    def _admit(self) -> bool:
        if self._closed:
            self.stats.refused["closed"] += 1
            return False
        if self._pending >= self.config.max_pending:
            self.stats.refused["busy"] += 1
            return False
        self._pending += 1
        return True

    async def _call(
        self, kind: Kind, messages: list[dict[str, str]], candidate_is_a: bool, pair_id: str, divergent: bool
    ) -> JudgeResult | None:
        """Run one admitted call; releases the admission whatever happens."""
        try:
            async with self._slots:
                if not self.budget.try_acquire():
                    self.stats.refused["budget"] += 1
                    return None
                self.stats.calls += 1
                start = self._clock()
                error = ""
                completion = Completion("")
                try:
                    async with asyncio.timeout(self.config.timeout_s):
                        completion = await self._complete(messages)
                except TimeoutError:
                    error = "timeout"
                except JudgeCallError as exc:
                    error = exc.error_class
                except Exception:  # noqa: BLE001 - an injected client's failure must not reach the caller
                    error = "error"
                latency_ms = (self._clock() - start) * 1000.0
        finally:
            self._pending -= 1
        base = JudgeResult(
            kind=kind, judge=self.config.judge_name, parsed=False, pair_id=pair_id, divergent=divergent
        )
        if error:
            self.stats.errors[error] += 1
            return _replace(base, ok=False, error_class=error, latency_ms=latency_ms)
        self.budget.spend(completion.cost_usd)
        self.stats.cost_usd += completion.cost_usd
        result = _verdict(base, completion.text, candidate_is_a)
        if result.parsed:
            self.stats.parsed += 1
        else:
            self.stats.unparsed += 1
        return _replace(result, cost_usd=completion.cost_usd, latency_ms=latency_ms)

    async def judge_pair(
        self,
        conversation: Sequence[Mapping[str, Any]],
        candidate: Answer | str,
        stable: Answer | str,
        *,
        pair_id: str = "",
        divergent: bool = False,
    ) -> JudgeResult | None:
        """Score a mirrored pair blind; None when refused."""
        if not self._admit():
            return None
        prompt = build_pair_prompt(conversation, candidate, stable, rubric=self.config.rubric, rng=self._rng)
        return await self._call("pair", prompt.messages, prompt.candidate_is_a, pair_id, divergent)

    async def judge_single(
        self, conversation: Sequence[Mapping[str, Any]], answer: Answer | str
    ) -> JudgeResult | None:
        """Score one production answer (continuous evaluation); None when refused."""
        if not self._admit():
            return None
        messages = build_single_prompt(conversation, answer, rubric=self.config.rubric)
        return await self._call("single", messages, False, "", False)

    def _own(self, call: Awaitable[JudgeResult | None]) -> None:
        async def run() -> None:
            result = await call
            if result is not None and self._on_result is not None:
                try:
                    self._on_result(result)
                except Exception:  # a recorder's failure must not kill the owner's other work
                    logger.exception("judge result callback failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def submit_pair(
        self,
        conversation: Sequence[Mapping[str, Any]],
        candidate: Answer | str,
        stable: Answer | str,
        *,
        pair_id: str = "",
        divergent: bool = False,
    ) -> bool:
        """Judge a pair in the background (result to `on_result`); False when refused."""
        if not self._admit():
            return False
        prompt = build_pair_prompt(conversation, candidate, stable, rubric=self.config.rubric, rng=self._rng)
        self._own(self._call("pair", prompt.messages, prompt.candidate_is_a, pair_id, divergent))
        return True

    def submit_single(self, conversation: Sequence[Mapping[str, Any]], answer: Answer | str) -> bool:
        if not self._admit():
            return False
        messages = build_single_prompt(conversation, answer, rubric=self.config.rubric)
        self._own(self._call("single", messages, False, "", False))
        return True

    async def aclose(self, timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S) -> None:
        """Stop admitting; wait up to `timeout_s` for owned tasks, cancel the rest. Idempotent."""
        self._closed = True
        tasks = set(self._tasks)
        if tasks:
            _, left = await asyncio.wait(tasks, timeout=timeout_s)
            for task in left:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._default is not None:
            await self._default.aclose()

    async def __aenter__(self) -> Judge:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _replace(result: JudgeResult, **changes: Any) -> JudgeResult:
    return dataclasses.replace(result, **changes)


def _verdict(base: JudgeResult, text: str, candidate_is_a: bool) -> JudgeResult:
    """Un-shuffle a parsed verdict back to candidate/stable; unparsed stays unparsed."""
    if base.kind == "single":
        score = parse_single_verdict(text)
        return base if score is None else _replace(base, parsed=True, score=score)
    verdict = parse_pair_verdict(text)
    if verdict is None:
        return base
    score_a, score_b, pref = verdict
    candidate, stable = (score_a, score_b) if candidate_is_a else (score_b, score_a)
    preference = "tie" if pref == "tie" else _PREFERENCE[(candidate_is_a, pref)]
    return _replace(base, parsed=True, score=candidate, stable_score=stable, preference=preference)

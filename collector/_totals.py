"""Cumulative per-series counters and histograms: what /metrics shows about agent traffic.

Kept here rather than in prometheus_client instruments so they are pure, exactly-once
(each counted event adds once, the same events the windows count) and checkpointed with
the windows: a collector restarted after SIGKILL serves the same totals it had, not zero.
`AgentTotalsCollector` exposes them in the Prometheus format; every family carries the
labels agent, version, role (never session or trace ids), some a bounded extra label.

    outrider_requests_total                      counter    LLM calls and tool calls
    outrider_errors_total{class}                 counter    by error class (collector._errclass)
    outrider_request_duration_seconds            histogram  LLM and tool call latency
    outrider_llm_calls_total                     counter
    outrider_llm_time_to_first_token_seconds     histogram  streamed calls
    outrider_llm_tokens{type=input|output}       histogram  tokens per call
    outrider_llm_cost_usd                        histogram  cost per call (its _sum: total cost)
    outrider_llm_fallbacks_total                 counter    calls served by a fallback tier
    outrider_llm_degraded_total                  counter    calls answered degraded
    outrider_llm_quota_total{outcome=waited|refused}  counter
    outrider_llm_quota_wait_seconds              histogram  the waits
    outrider_tool_calls_total                    counter
    outrider_tool_failures_total                 counter
    outrider_safety_events_total{category,action}  counter
    outrider_feedback_total{kind}                counter    thumbs_up, thumbs_down, task_success, ...
    outrider_feedback_score                      histogram  scores given
    outrider_breaker_transitions_total{upstream,new_state}  counter
    outrider_shadow_pairs_total                  counter    mirrored calls compared (role shadow)
    outrider_shadow_tool_disagreements_total     counter    pairs whose tool decisions differ
    outrider_shadow_intercepted_writes_total     counter    write tools of shadow sessions not run
    outrider_judge_verdicts_total{kind,result}   counter    kind pair|single, result parsed|unparsed
    outrider_judge_cost_usd_total                counter    the judge calls' own cost
    outrider_judge_score{kind}                   histogram  parsed scores (pair: the candidate's)
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from collector._errclass import QUOTA, classify
from collector._rows import ROW_EVENT, Row, event_of, heads, read_rows
from outrider.v1 import common_pb2, events_pb2, sidecar_pb2

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
COST_BUCKETS_USD = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
SCORE_BUCKETS = (0.2, 0.4, 0.6, 0.8, 1.0)
MAX_SERIES = 50_000  # label sets per family; beyond this new ones are dropped and counted
STATE_FORMAT = 1
SERIES_LABELS = ("agent", "version", "role")


@dataclass(frozen=True)
class _Family:
    name: str
    help: str
    extra: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None  # None: a counter


_FAMILIES = {
    f.name: f
    for f in (
        _Family("outrider_requests_total", "Agent requests (LLM and tool calls) seen in events"),
        _Family("outrider_errors_total", "Agent requests that ended in an error, by class", ("class",)),
        _Family("outrider_request_duration_seconds", "Agent request latency", buckets=LATENCY_BUCKETS_S),
        _Family("outrider_llm_calls_total", "LLM calls (Chat and ChatStream)"),
        _Family(
            "outrider_llm_time_to_first_token_seconds",
            "Time to the first streamed token",
            buckets=LATENCY_BUCKETS_S,
        ),
        _Family("outrider_llm_tokens", "Tokens per LLM call", ("type",), TOKEN_BUCKETS),
        _Family("outrider_llm_cost_usd", "Cost per LLM call in US dollars", buckets=COST_BUCKETS_USD),
        _Family("outrider_llm_fallbacks_total", "LLM calls served by a fallback tier"),
        _Family("outrider_llm_degraded_total", "LLM calls answered in degraded mode"),
        _Family("outrider_llm_quota_total", "LLM calls that waited for or were refused quota", ("outcome",)),
        _Family(
            "outrider_llm_quota_wait_seconds", "Time LLM calls waited for quota", buckets=LATENCY_BUCKETS_S
        ),
        _Family("outrider_tool_calls_total", "Tool calls"),
        _Family("outrider_tool_failures_total", "Tool calls that failed"),
        _Family("outrider_safety_events_total", "Guardrail hits", ("category", "action")),
        _Family("outrider_feedback_total", "User feedback signals", ("kind",)),
        _Family("outrider_feedback_score", "User feedback scores", buckets=SCORE_BUCKETS),
        _Family(
            "outrider_breaker_transitions_total",
            "Circuit breaker state changes",
            ("upstream", "new_state"),
        ),
        _Family("outrider_shadow_pairs_total", "Mirrored calls compared with stable's (shadow)"),
        _Family("outrider_shadow_tool_disagreements_total", "Mirrored calls whose tool decisions differ"),
        _Family("outrider_shadow_intercepted_writes_total", "Write tools of shadow sessions intercepted"),
        _Family("outrider_judge_verdicts_total", "LLM-as-judge verdicts", ("kind", "result")),
        _Family("outrider_judge_cost_usd_total", "Cost of the judge calls in US dollars"),
        _Family("outrider_judge_score", "LLM-as-judge scores", ("kind",), SCORE_BUCKETS),
    )
}
FAMILY_NAMES = tuple(_FAMILIES)
_BUCKETS = {name: f.buckets for name, f in _FAMILIES.items() if f.buckets is not None}
_FEEDBACK_KINDS = {
    sidecar_pb2.FEEDBACK_KIND_THUMBS_UP: "thumbs_up",
    sidecar_pb2.FEEDBACK_KIND_THUMBS_DOWN: "thumbs_down",
    sidecar_pb2.FEEDBACK_KIND_TASK_SUCCESS: "task_success",
    sidecar_pb2.FEEDBACK_KIND_TASK_FAILURE: "task_failure",
    sidecar_pb2.FEEDBACK_KIND_SCORE: "score",
}

Labels = tuple[str, ...]


@functools.lru_cache(maxsize=64)  # a handful of roles, named on every event
def role_label(role: int) -> str:
    try:
        return common_pb2.Role.Name(role).removeprefix("ROLE_").lower()  # type: ignore[arg-type]
    except ValueError:
        return "unknown"


class _Hist:
    __slots__ = ("counts", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * (size + 1)  # the last one is +Inf
        self.sum = 0.0


class AgentTotals:
    """Cumulative counts per family and label set. Pure; `observe` the events the windows counted."""

    def __init__(self) -> None:
        self._counters: dict[str, dict[Labels, float]] = {
            n: {} for n, f in _FAMILIES.items() if f.buckets is None
        }
        self._hists: dict[str, dict[Labels, _Hist]] = {n: {} for n, f in _FAMILIES.items() if f.buckets}
        self.dropped_series = 0

    def _room(self, table: Mapping[Labels, object], labels: Labels) -> bool:
        if labels in table or len(table) < MAX_SERIES:
            return True
        self.dropped_series += 1
        return False

    def inc(self, family: str, labels: Labels, amount: float = 1.0) -> None:
        table = self._counters[family]
        if labels in table:
            table[labels] += amount
        elif self._room(table, labels):
            table[labels] = amount

    def observe(self, family: str, labels: Labels, value: float) -> None:
        if not math.isfinite(value):
            return
        table = self._hists[family]
        buckets = _BUCKETS[family]
        hist = table.get(labels)
        if hist is None:
            if not self._room(table, labels):
                return
            hist = table[labels] = _Hist(len(buckets))
        hist.counts[bisect.bisect_left(buckets, value)] += 1
        hist.sum += value

    def value(self, family: str, labels: Labels) -> float:
        """A counter's value, or a histogram's count (0 when never seen)."""
        if family in self._counters:
            return self._counters[family].get(labels, 0.0)
        hist = self._hists[family].get(labels)
        return float(sum(hist.counts)) if hist is not None else 0.0

    def add_event(self, event: events_pb2.Event) -> None:
        """Count one event (call this only for events the windows counted: exactly once)."""
        body = event.WhichOneof("body")
        series: Labels = (event.agent, event.version_id, role_label(event.role))
        if body == "call":
            call = event.call
            self.inc("outrider_requests_total", series)
            self.inc("outrider_llm_calls_total", series)
            if call.outcome == events_pb2.OUTCOME_ERROR:
                error_class = classify(call.error_class)
                self.inc("outrider_errors_total", (*series, error_class))
                if error_class == QUOTA:
                    self.inc("outrider_llm_quota_total", (*series, "refused"))
            self.observe("outrider_request_duration_seconds", series, max(call.latency_ms, 0.0) / 1000)
            if call.time_to_first_token_ms > 0:
                self.observe(
                    "outrider_llm_time_to_first_token_seconds", series, call.time_to_first_token_ms / 1000
                )
            self.observe("outrider_llm_tokens", (*series, "input"), max(call.input_tokens, 0))
            self.observe("outrider_llm_tokens", (*series, "output"), max(call.output_tokens, 0))
            self.observe("outrider_llm_cost_usd", series, max(call.cost_usd, 0.0))
            if call.fallback_tier > 0:
                self.inc("outrider_llm_fallbacks_total", series)
            if call.degraded:
                self.inc("outrider_llm_degraded_total", series)
            if call.quota_wait_ms > 0:
                self.inc("outrider_llm_quota_total", (*series, "waited"))
                self.observe("outrider_llm_quota_wait_seconds", series, call.quota_wait_ms / 1000)
        elif body == "tool":
            tool = event.tool
            self.inc("outrider_requests_total", series)
            self.inc("outrider_tool_calls_total", series)
            if tool.outcome == events_pb2.OUTCOME_ERROR:
                self.inc("outrider_errors_total", (*series, classify(tool.error_class, tool=True)))
                self.inc("outrider_tool_failures_total", series)
            self.observe("outrider_request_duration_seconds", series, max(tool.latency_ms, 0.0) / 1000)
        elif body == "feedback":
            kind = _FEEDBACK_KINDS.get(event.feedback.kind, "unspecified")  # type: ignore[call-overload]
            self.inc("outrider_feedback_total", (*series, kind))
            if event.feedback.kind == sidecar_pb2.FEEDBACK_KIND_SCORE or event.feedback.score:
                self.observe("outrider_feedback_score", series, event.feedback.score)
        elif body == "safety":
            safety = event.safety
            labels = (*series, safety.category or "unknown", safety.action or "unknown")
            self.inc("outrider_safety_events_total", labels, max(safety.count, 1))
        elif body == "breaker":
            breaker = event.breaker
            labels = (*series, breaker.upstream or "unknown", breaker.new_state or "unknown")
            self.inc("outrider_breaker_transitions_total", labels)
        elif body == "shadow":
            self.inc("outrider_shadow_pairs_total", series)
            if not event.shadow.tools_agree:
                self.inc("outrider_shadow_tool_disagreements_total", series)
        elif body == "judge":
            self._judge(event.judge, series)
        if body == "tool" and event.tool.intercepted and event.role == common_pb2.ROLE_SHADOW:
            self.inc("outrider_shadow_intercepted_writes_total", series)

    def add_events(self, events: Sequence[tuple[events_pb2.Event, str | None]]) -> None:
        """`add_event` for each (event, its body) in order, with the same result."""
        self.add_rows(read_rows(heads(events)))

    def add_rows(self, rows: Sequence[Row]) -> None:
        """`add_events` of the events as rows (`collector._rows`).

        Calls and tool calls (nearly every event) take an inlined path: the tables are looked
        up once per series and batch, and no label set can be refused (checked first, for the
        whole batch: an event adds at most two label sets to a family), so the room check is
        skipped. Histogram sums are added value by value in the rows' order."""
        tables: list[Mapping[Labels, object]] = [*self._counters.values(), *self._hists.values()]
        if any(len(table) + 2 * len(rows) >= MAX_SERIES for table in tables):
            for row in rows:
                self.add_event(event_of(row[ROW_EVENT]))
            return
        counters, hists = self._counters, self._hists
        durations = hists["outrider_request_duration_seconds"]
        ttfts, tokens = hists["outrider_llm_time_to_first_token_seconds"], hists["outrider_llm_tokens"]
        costs = hists["outrider_llm_cost_usd"]
        latency_size, token_size = len(LATENCY_BUCKETS_S), len(TOKEN_BUCKETS)
        cost_size = len(COST_BUCKETS_USD)
        isfinite, where = math.isfinite, bisect.bisect_left
        # per (agent, version, role) in this batch: its label sets, its histograms (each made on
        # its first finite value, as `observe` makes it) and its call and tool counts
        handles: dict[tuple[str, str, int], list[Any]] = {}
        by_series: dict[Labels, list[Any]] = {}
        requests, llm_calls = counters["outrider_requests_total"], counters["outrider_llm_calls_total"]
        tool_calls = counters["outrider_tool_calls_total"]
        for body, agent, _, _, version, role, _, event, detail in rows:
            if body != "call" and body != "tool":
                self.add_event(event_of(event))
                continue
            if (h := handles.get(key := (agent, version, role))) is None:
                # roles unknown to this build share the label "unknown", so their handle too
                series = (agent, version, role_label(role))
                if (h := by_series.get(series)) is None:
                    h = by_series[series] = _handle(series, durations, ttfts, tokens, costs)
                    requests.setdefault(series, 0.0)  # each table keeps the order of first events
                handles[key] = h
            series = h[0]
            if body == "call":
                outcome, error_class, latency, ttft, inputs, outputs, _, cost, tier, worse, wait, _ = detail  # type: ignore[misc]
                if not h[8]:
                    llm_calls.setdefault(series, 0.0)
                h[8] += 1
                if outcome == _ERROR:
                    error_class = classify(error_class)
                    self.inc("outrider_errors_total", (*series, error_class))
                    if error_class == QUOTA:
                        self.inc("outrider_llm_quota_total", (*series, "refused"))
                value = (0.0 if latency < 0.0 else latency) / 1000  # max(latency, 0.0): NaN stays NaN
                if isfinite(value):
                    if (hist := h[3]) is None:
                        hist = h[3] = durations[series] = _Hist(latency_size)
                    hist.counts[where(LATENCY_BUCKETS_S, value)] += 1
                    hist.sum += value
                if ttft > 0 and isfinite(value := ttft / 1000):
                    if (hist := h[4]) is None:
                        hist = h[4] = ttfts[series] = _Hist(latency_size)
                    hist.counts[where(LATENCY_BUCKETS_S, value)] += 1
                    hist.sum += value
                count = inputs if inputs > 0 else 0
                if (hist := h[5]) is None:
                    hist = h[5] = tokens[h[1]] = _Hist(token_size)
                hist.counts[where(TOKEN_BUCKETS, count)] += 1
                hist.sum += count
                count = outputs if outputs > 0 else 0
                if (hist := h[6]) is None:
                    hist = h[6] = tokens[h[2]] = _Hist(token_size)
                hist.counts[where(TOKEN_BUCKETS, count)] += 1
                hist.sum += count
                value = 0.0 if cost < 0.0 else cost
                if isfinite(value):
                    if (hist := h[7]) is None:
                        hist = h[7] = costs[series] = _Hist(cost_size)
                    hist.counts[where(COST_BUCKETS_USD, value)] += 1
                    hist.sum += value
                if tier > 0:
                    self.inc("outrider_llm_fallbacks_total", series)
                if worse:
                    self.inc("outrider_llm_degraded_total", series)
                if wait > 0:
                    self.inc("outrider_llm_quota_total", (*series, "waited"))
                    self.observe("outrider_llm_quota_wait_seconds", series, wait / 1000)
            else:
                outcome, error_class, latency, intercepted = detail  # type: ignore[misc]
                if not h[9]:
                    tool_calls.setdefault(series, 0.0)
                h[9] += 1
                if outcome == _ERROR:
                    self.inc("outrider_errors_total", (*series, classify(error_class, tool=True)))
                    self.inc("outrider_tool_failures_total", series)
                value = (0.0 if latency < 0.0 else latency) / 1000  # max(latency, 0.0): NaN stays NaN
                if isfinite(value):
                    if (hist := h[3]) is None:
                        hist = h[3] = durations[series] = _Hist(latency_size)
                    hist.counts[where(LATENCY_BUCKETS_S, value)] += 1
                    hist.sum += value
                if intercepted and role == common_pb2.ROLE_SHADOW:
                    self.inc("outrider_shadow_intercepted_writes_total", series)
        # the counts, once per series (whole numbers: the same as adding 1 per event)
        for h in by_series.values():
            series, calls, tools = h[0], h[8], h[9]
            requests[series] += float(calls + tools)
            if calls:
                llm_calls[series] += float(calls)
            if tools:
                tool_calls[series] += float(tools)

    def _judge(self, judge: events_pb2.JudgeRecord, series: Labels) -> None:
        kind = judge.kind if judge.kind in ("pair", "single") else "unknown"
        self.inc("outrider_judge_verdicts_total", (*series, kind, "parsed" if judge.parsed else "unparsed"))
        if math.isfinite(judge.cost_usd) and judge.cost_usd > 0:
            self.inc("outrider_judge_cost_usd_total", series, judge.cost_usd)
        if judge.parsed:
            self.observe("outrider_judge_score", (*series, kind), judge.score)

    def families(self) -> Iterator[Metric]:
        """The Prometheus metric families, cumulative."""
        for name, family in _FAMILIES.items():
            labels = [*SERIES_LABELS, *family.extra]
            if family.buckets is None:
                counter = CounterMetricFamily(name.removesuffix("_total"), family.help, labels=labels)
                for values, amount in self._counters[name].items():
                    counter.add_metric(list(values), amount)
                yield counter
                continue
            hist_family = HistogramMetricFamily(name, family.help, labels=labels)
            for values, hist in self._hists[name].items():
                cumulative, buckets = 0, []
                for bound, count in zip((*family.buckets, math.inf), hist.counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == math.inf else _bound(bound), cumulative))
                hist_family.add_metric(list(values), buckets, hist.sum)
            yield hist_family

    def to_state(self, agents: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """Everything, or the series of `agents` (every family's first label is the agent)."""

        def mine(labels: Labels) -> bool:
            return agents is None or agents(labels[0])

        return {
            "format": STATE_FORMAT,
            "counters": {
                n: [[list(k), v] for k, v in t.items() if mine(k)] for n, t in self._counters.items()
            },
            "histograms": {
                n: [[list(k), h.counts, h.sum] for k, h in t.items() if mine(k)]
                for n, t in self._hists.items()
            },
        }

    def load_state(self, state: Mapping[str, Any], agents: Callable[[str], bool] | None = None) -> None:
        """Replace the totals with a `to_state` result (with `agents`: only those agents' series);
        families no longer known are skipped."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"totals state format {state.get('format')!r}, expected {STATE_FORMAT}")
        counters = {
            name: {tuple(k): float(v) for k, v in state["counters"].get(name, [])} for name in self._counters
        }
        hists: dict[str, dict[Labels, _Hist]] = {}
        for name in self._hists:
            buckets = _BUCKETS[name]
            table = hists[name] = {}
            for key, counts, total in state["histograms"].get(name, []):
                if len(counts) != len(buckets) + 1:
                    continue  # the buckets changed: start that series again
                hist = table[tuple(key)] = _Hist(len(buckets))
                hist.counts, hist.sum = [int(c) for c in counts], float(total)
        if agents is None:
            self._counters, self._hists = counters, hists  # all parsed: only now replace anything
            return
        self.forget(agents)
        for name, loaded in counters.items():
            self._counters[name].update((k, v) for k, v in loaded.items() if agents(k[0]))
        for name, loaded_hists in hists.items():
            self._hists[name].update((k, h) for k, h in loaded_hists.items() if agents(k[0]))

    def forget(self, agents: Callable[[str], bool]) -> None:
        """Drop every series of `agents`."""
        for counters in self._counters.values():
            for key in [k for k in counters if agents(k[0])]:
                del counters[key]
        for hists in self._hists.values():
            for key in [k for k in hists if agents(k[0])]:
                del hists[key]


_ERROR = events_pb2.OUTCOME_ERROR


def _handle(
    series: Labels,
    durations: dict[Labels, _Hist],
    ttfts: dict[Labels, _Hist],
    tokens: dict[Labels, _Hist],
    costs: dict[Labels, _Hist],
) -> list[Any]:
    """[series, its input and output token labels, then its duration, TTFT, input, output and
    cost histograms, None where there is none yet, then its calls and tool calls so far: 0]."""
    inputs, outputs = (*series, "input"), (*series, "output")
    return [
        series,
        inputs,
        outputs,
        durations.get(series),
        ttfts.get(series),
        tokens.get(inputs),
        tokens.get(outputs),
        costs.get(series),
        0,
        0,
    ]


def _bound(value: float) -> str:
    return repr(float(value))


class AgentTotalsCollector(Collector):
    """Registers `AgentTotals` with a prometheus_client registry."""

    def __init__(self, totals: AgentTotals) -> None:
        self._totals = totals

    def collect(self) -> Iterator[Metric]:
        return self._totals.families()

    def describe(self) -> Iterator[Metric]:
        return iter(())

"""Guardrails over a streamed reply: redact matches even when they span chunk boundaries.

The redactor keeps the not-yet-emitted tail of the stream and, on each delta, emits the
longest prefix that no later text can change: it cuts only right after a whitespace
character, before the point from which a guard says a match may still be growing
(`Guard.hold_from`), and never inside anything a guard looked at. Under the guards'
streaming contract (`_guards_base`) the concatenation of everything emitted equals
``policy.scan_output(full_text).text``, and the hits add up to the same counts.

Memory is bounded: if the tail grows past ``max_pending`` characters without a usable cut
(a long run without whitespace), the redactor cuts anyway, well behind the longest
possible match and never through a match it has seen. After such a forced cut it may
redact a little more than a whole-text scan would, never less.

Once a BLOCK rule hits, the stream is blocked: the text before the blocking match is
emitted (redacted as usual), the match and everything after it are dropped, and the caller
ends the stream with an error.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from sidecar.guards._base import Action
from sidecar.guards._policy import GuardPolicy, Hit, RuleMatch, hits_from, redact

#: Characters of un-emitted text the redactor keeps before it forces a cut.
DEFAULT_MAX_PENDING = 16_384
# raw text kept before the tail after a forced cut, so look-behinds see real context
_CONTEXT = 64
_WHITESPACE = re.compile(r"\s")


@dataclass(frozen=True, slots=True)
class StreamOutput:
    """What to send on after one delta: text (possibly empty), new hits, and whether the
    stream is now blocked."""

    text_to_emit: str
    hits: list[Hit] = field(default_factory=list)
    blocked: bool = False


class StreamRedactor:
    """Applies a policy's output rules to a stream of text deltas. Synchronous, no I/O."""

    def __init__(self, policy: GuardPolicy, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._rules = policy.rules_for("output")
        self._max_match = max((rule.guard.max_match_len for rule in self._rules), default=0)
        # a forced cut must leave room for the longest match behind it
        self._max_pending = max(max_pending, 2 * (self._max_match + 2))
        self._pending = ""
        self._context = ""
        self._blocked = False
        self._finished = False
        self._counts: Counter[tuple[int, str]] = Counter()

    @property
    def blocked(self) -> bool:
        return self._blocked

    @property
    def pending_chars(self) -> int:
        """Characters received but not yet emitted."""
        return len(self._pending)

    @property
    def hits(self) -> list[Hit]:
        """Every hit so far."""
        return hits_from(self._rules, self._counts)

    def feed(self, delta: str) -> StreamOutput:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._blocked:
            return StreamOutput("", [], True)
        if not self._rules:
            return StreamOutput(delta)
        self._pending += delta
        return self._advance(final=False)

    def finish(self) -> StreamOutput:
        """Flush the tail at the end of the stream (idempotent)."""
        if self._finished or self._blocked:
            self._finished = True
            return StreamOutput("", [], self._blocked)
        self._finished = True
        if not self._rules:
            return StreamOutput("")
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> StreamOutput:
        text = self._context + self._pending
        offset = len(self._context)
        found: list[RuleMatch] = []
        regions: list[tuple[int, int]] = []
        for index, rule in enumerate(self._rules):
            scan = rule.guard.scan(text)
            found.extend(RuleMatch(match, index, rule.action) for match in scan.matches)
            regions.extend(scan.regions)
        cut = len(text) if final else self._cut(text, offset, found, regions)
        if cut <= offset:
            return StreamOutput("")
        segment = [rm for rm in found if rm.match.start < cut and rm.match.end > offset]
        counts = Counter((rm.rule, rm.match.category) for rm in segment if rm.match.start >= offset)
        self._counts.update(counts)
        hits = hits_from(self._rules, counts)
        blocking = [rm.match.start for rm in segment if rm.action is Action.BLOCK]
        if blocking:
            # pass on what precedes the first blocking match (not cutting through another
            # match), then nothing more
            stop = max(min(blocking), offset)
            while straddling := [rm.match.start for rm in segment if rm.match.start < stop < rm.match.end]:
                stop = max(min(straddling), offset)
            before = [rm for rm in segment if rm.match.end <= stop]
            self._blocked = True
            self._pending = self._context = ""
            return StreamOutput(redact(text[offset:stop], before, offset=offset), hits, True)
        emitted = redact(text[offset:cut], segment, offset=offset)
        self._pending = text[cut:]
        self._context = "" if text[cut - 1].isspace() else text[max(0, cut - _CONTEXT) : cut]
        return StreamOutput(emitted, hits, False)

    def _cut(self, text: str, offset: int, found: list[RuleMatch], regions: list[tuple[int, int]]) -> int:
        """The furthest safe place to cut ``text``, or ``offset`` for "not yet"."""
        limit = min(rule.guard.hold_from(text) for rule in self._rules)
        busy = _union(regions)
        starts = [start for start, _ in busy]
        if limit > offset:
            for ws in reversed([m.start() for m in _WHITESPACE.finditer(text, offset, limit)]):
                if not _inside(ws + 1, busy, starts):
                    return ws + 1
        if len(text) - offset <= self._max_pending:
            return offset
        # forced: far enough back that every match starting before it is complete, moved
        # forward past any match that straddles it
        cut = len(text) - self._max_match - 2
        moved = True
        while moved:
            moved = False
            for rm in found:
                if rm.match.start < cut < rm.match.end:
                    cut, moved = rm.match.end, True
        return cut


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _inside(position: int, busy: list[tuple[int, int]], starts: list[int]) -> bool:
    index = bisect_left(starts, position) - 1
    return index >= 0 and busy[index][0] < position < busy[index][1]


__all__ = ["DEFAULT_MAX_PENDING", "StreamOutput", "StreamRedactor"]

"""The guard seam: what a guardrail finds, and the regex machinery the built-ins share.

A guard reports *where* something is (category, start, end), never *what* it is: the
matched text stays in the caller's string and is never copied into anything that leaves
the guard (events carry category, action, guard name and counts only).

Streaming contract (what `StreamRedactor` relies on to cut a stream into chunks without
changing the result):

- ``scan(text)`` depends only on the text: scanning a suffix that starts right after a
  whitespace character finds exactly the matches (and regions) of the whole text that lie
  in that suffix. Regex guards get this by using only negative look-behinds that never
  exclude whitespace (``\\b``, ``(?<![\\w-])`` and the like).
- ``regions`` are every span the guard's decision depended on: the matches plus
  rejected candidates (a 16-digit run that failed Luhn). A stream never cuts inside one.
- ``hold_from(text)``: every match or region that starts before this index is final, that
  is, more text appended to ``text`` cannot change it.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

#: Where a guard looks: at what the agent sends, or at what the model answers.
Direction = Literal["input", "output"]

#: The longest match a guard without its own figure is assumed to produce.
DEFAULT_MAX_MATCH_LEN = 256


class Action(StrEnum):
    """What a rule does on a hit. Stronger actions win: BLOCK > REDACT > FLAG."""

    FLAG = "flag"
    REDACT = "redact"
    BLOCK = "block"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {Action.FLAG: 0, Action.REDACT: 1, Action.BLOCK: 2}


class Category(StrEnum):
    """The categories of the built-in guards (custom guards may use any string)."""

    PROMPT_INJECTION = "prompt_injection"
    PII_EMAIL = "pii.email"
    PII_PHONE = "pii.phone"
    PII_CARD = "pii.card"
    PII_NATIONAL_ID = "pii.national_id"
    SECRET = "secret"


@dataclass(frozen=True, slots=True)
class Match:
    """A hit's position in the scanned text; deliberately without the text itself."""

    category: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class GuardScan:
    """A guard's answer for one text: its matches and every span its decision looked at."""

    matches: list[Match]
    regions: list[tuple[int, int]]


class Guard(ABC):
    """A guardrail. Subclass it, set the three attributes and implement `find`."""

    name: str
    category: str
    scans: Direction
    #: An upper bound on a match's length; a stream holds back at most this much.
    max_match_len: int = DEFAULT_MAX_MATCH_LEN

    @abstractmethod
    def find(self, text: str) -> list[Match]:
        """The matches in ``text``, sorted by start, not overlapping one another."""

    def scan(self, text: str) -> GuardScan:
        matches = self.find(text)
        return GuardScan(matches, [(m.start, m.end) for m in matches])

    def hold_from(self, text: str) -> int:
        """An index before which every match of ``text`` is final (see the module doc)."""
        return max(0, len(text) - self.max_match_len - 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, category={self.category!r}, scans={self.scans!r})"


@dataclass(frozen=True, slots=True)
class Pattern:
    """One regex of a `RegexGuard`.

    ``max_len`` bounds a match's length. ``ws_lead`` bounds the offset of any whitespace
    character inside a match (-1: a match never contains whitespace); together they tell
    how much of a stream's tail a match still in progress can occupy. ``accept`` vets a
    candidate (Luhn, digit counts); a rejected candidate is still a region.
    """

    regex: re.Pattern[str]
    max_len: int
    ws_lead: int = -1
    accept: Callable[[str], bool] | None = None
    category: str | None = None
    #: replaces the length-based bound for patterns that know better (an open PEM block)
    hold: Callable[[str, int], int] | None = None
    #: a cheap pre-check: the regex runs only if one of these lower-case strings occurs in
    #: the lower-cased text (for case-insensitive patterns that cannot use a literal prefix)
    trigger: tuple[str, ...] = ()

    def hold_from(self, text: str, last_ws: int) -> int:
        if self.hold is not None:
            return self.hold(text, last_ws)
        # a match still in progress covers [start, len(text)); if it contains whitespace it
        # contains the last one, so it starts at most ws_lead before it, otherwise after it
        return max(0, len(text) - self.max_len - 1, last_ws - self.ws_lead)


_LAST_WS = re.compile(r"\s(?=\S*\Z)")
# lower() misses a few letters that IGNORECASE regexes treat as i, s and k
_FOLD = str.maketrans({"\u0131": "i", "\u017f": "s", "\u212a": "k", "\u0307": None})


def fold(text: str) -> str:
    """``text`` lower-cased for trigger checks (lengths may change: never use offsets)."""
    return text.lower().translate(_FOLD)


def last_whitespace(text: str) -> int:
    """The index of the last whitespace character in ``text``, or -1."""
    stop = max(-1, len(text) - 257)
    for index in range(len(text) - 1, stop, -1):
        if text[index].isspace():
            return index
    found = _LAST_WS.search(text, 0, stop + 1)
    return found.start() if found else -1


class RegexGuard(Guard):
    """A guard made of precompiled patterns (bounded quantifiers only: no catastrophic
    backtracking, and a known longest match for streaming)."""

    def __init__(self, *, name: str, category: str, scans: Direction, patterns: Sequence[Pattern]) -> None:
        if not patterns:
            raise ValueError("a RegexGuard needs at least one pattern")
        self.name = str(name)
        self.category = str(category)
        self.scans = scans
        self.patterns = tuple(patterns)
        self.max_match_len = max(p.max_len for p in self.patterns)

    def scan(self, text: str) -> GuardScan:
        candidates: list[Match] = []
        regions: list[tuple[int, int]] = []
        folded: str | None = None
        for pattern in self.patterns:
            if pattern.trigger:
                if folded is None:
                    folded = fold(text)
                if not any(word in folded for word in pattern.trigger):
                    continue
            category = pattern.category or self.category
            for found in pattern.regex.finditer(text):
                start, end = found.span()
                regions.append((start, end))
                if pattern.accept is None or pattern.accept(found.group()):
                    candidates.append(Match(category, start, end))
        return GuardScan(merge_overlaps(candidates), regions)

    def find(self, text: str) -> list[Match]:
        return self.scan(text).matches

    def hold_from(self, text: str) -> int:
        last_ws = last_whitespace(text)
        return min(p.hold_from(text, last_ws) for p in self.patterns)


def merge_overlaps(matches: Iterable[Match]) -> list[Match]:
    """Overlapping matches become one spanning their union, named for the earliest (the
    longest of those starting together). Touching matches stay apart."""
    merged: list[Match] = []
    for match in sorted(matches, key=lambda m: (m.start, -m.end)):
        if merged and match.start < merged[-1].end:
            last = merged[-1]
            if match.end > last.end:
                merged[-1] = Match(last.category, last.start, match.end)
        else:
            merged.append(match)
    return merged

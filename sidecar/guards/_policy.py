"""A version's guardrail policy: which guards run, with which action, and what a scan yields.

    policy = build_policy({"prompt_injection": "block", "pii": "redact", "secret": "block"})
    outcome = policy.scan_output(reply)   # GuardOutcome(blocked, text, hits)

Actions are ordered BLOCK > REDACT > FLAG: any BLOCK hit blocks the whole text; REDACT
hits are replaced by ``[REDACTED:<category>]`` (overlapping ones merge into one marker, named
for the earliest); FLAG hits only report. A hit names its category, action, guard and
count, never the text it matched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sidecar.guards._base import Action, Direction, Guard, Match, merge_overlaps
from sidecar.guards._builtin import BUILTIN_GUARDS

#: A policy-spec name that stands for every built-in PII guard.
PII_GROUP = "pii"
_PII = tuple(str(name) for name in BUILTIN_GUARDS if name.startswith(PII_GROUP + "."))


class GuardConfigError(ValueError):
    """A guardrail policy that cannot be built; the message names the bad field."""


@dataclass(frozen=True, slots=True)
class GuardRule:
    guard: Guard
    action: Action


@dataclass(frozen=True, slots=True)
class Hit:
    """What a safety event reports: never the matched text."""

    category: str
    action: Action
    guard_name: str
    count: int


@dataclass(frozen=True, slots=True)
class GuardOutcome:
    """The result of a scan. ``text`` has REDACT hits replaced; it is empty when blocked
    (nothing of a blocked text is safe to pass on)."""

    blocked: bool
    text: str
    hits: list[Hit] = field(default_factory=list)

    @property
    def action(self) -> Action | None:
        """The strongest action taken, or None when nothing was found."""
        return max((hit.action for hit in self.hits), key=lambda a: a.severity, default=None)


@dataclass(frozen=True, slots=True)
class RuleMatch:
    """A match tagged with the rule that found it (internal to policy and stream)."""

    match: Match
    rule: int
    action: Action


def redaction_marker(category: str) -> str:
    return f"[REDACTED:{category}]"


def redact(text: str, found: Iterable[RuleMatch], *, offset: int = 0) -> str:
    """``text`` with every REDACT or BLOCK match replaced by its marker (positions are
    ``offset`` ahead of ``text``'s; a match reaching before ``offset`` is clipped)."""
    spans = merge_overlaps(
        Match(rm.match.category, max(rm.match.start, offset) - offset, rm.match.end - offset)
        for rm in found
        if rm.action is not Action.FLAG and rm.match.end > offset
    )
    if not spans:
        return text
    parts: list[str] = []
    position = 0
    for span in spans:
        parts.append(text[position : span.start])
        parts.append(redaction_marker(span.category))
        position = span.end
    parts.append(text[position:])
    return "".join(parts)


def count_hits(found: Iterable[RuleMatch]) -> Counter[tuple[int, str]]:
    return Counter((rm.rule, rm.match.category) for rm in found)


def hits_from(rules: Sequence[GuardRule], counts: Counter[tuple[int, str]]) -> list[Hit]:
    return [
        Hit(category, rules[rule].action, rules[rule].guard.name, count)
        for (rule, category), count in sorted(counts.items())
    ]


class GuardPolicy:
    """An immutable list of rules; guards named once each."""

    def __init__(self, rules: Sequence[GuardRule] = ()) -> None:
        names = [rule.guard.name for rule in rules]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise GuardConfigError(f"guard {duplicates[0]!r} appears more than once")
        self.rules: tuple[GuardRule, ...] = tuple(rules)

    def rules_for(self, direction: Direction) -> tuple[GuardRule, ...]:
        return tuple(rule for rule in self.rules if rule.guard.scans == direction)

    def scan_input(self, text: str) -> GuardOutcome:
        return self._scan(text, self.rules_for("input"))

    def scan_output(self, text: str) -> GuardOutcome:
        return self._scan(text, self.rules_for("output"))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def __repr__(self) -> str:
        inner = ", ".join(f"{rule.guard.name}={rule.action.value}" for rule in self.rules)
        return f"GuardPolicy({inner})"

    @staticmethod
    def _scan(text: str, rules: Sequence[GuardRule]) -> GuardOutcome:
        if not rules or not text:
            return GuardOutcome(False, text, [])
        found = [
            RuleMatch(match, index, rule.action)
            for index, rule in enumerate(rules)
            for match in rule.guard.find(text)
        ]
        hits = hits_from(rules, count_hits(found))
        if any(rm.action is Action.BLOCK for rm in found):
            return GuardOutcome(True, "", hits)
        return GuardOutcome(False, redact(text, found), hits)


def parse_action(value: object, *, field: str) -> Action:
    if isinstance(value, Action):
        return value
    if isinstance(value, str):
        try:
            return Action(value.strip().lower())
        except ValueError:
            pass
    choices = ", ".join(a.value for a in Action)
    raise GuardConfigError(f"{field}: must be one of {choices}, got {value!r}")


GuardFactory = Guard | Callable[[], Guard]


def build_policy(
    spec: Mapping[str, object] | Sequence[Mapping[str, object]] | None,
    *,
    field: str = "guardrails",
    registry: Mapping[str, GuardFactory] | None = None,
) -> GuardPolicy:
    """A policy from config: ``{guard: action}`` or ``[{guard: name, action: ...}, ...]``.

    Guard names are the built-in categories (``prompt_injection``, ``pii.email``,
    ``pii.phone``, ``pii.card``, ``pii.national_id``, ``secret``); ``pii`` stands for all
    four PII guards, and a PII guard named on its own overrides the group.
    ``registry`` adds or replaces guards: name -> a Guard instance or a no-argument factory.
    Errors name the field: ``guardrails[1].action: must be one of flag, redact, block, got
    'drop'``, ``guardrails.pii.emial: unknown guard 'pii.emial' (known: ...)``.
    """
    if spec is None:
        return GuardPolicy()
    factories: dict[str, GuardFactory] = {str(name): factory for name, factory in BUILTIN_GUARDS.items()}
    factories.update(registry or {})
    known = ", ".join(sorted({*factories, PII_GROUP}))
    chosen: dict[str, Action] = {}
    group: Action | None = None
    for entry in _entries(spec, field):
        action = parse_action(entry.action, field=entry.action_field)
        if entry.name == PII_GROUP and PII_GROUP not in factories:
            if group is not None:
                raise GuardConfigError(f"{entry.guard_field}: guard {PII_GROUP!r} appears more than once")
            group = action
            continue
        if entry.name not in factories:
            raise GuardConfigError(f"{entry.guard_field}: unknown guard {entry.name!r} (known: {known})")
        if entry.name in chosen:
            raise GuardConfigError(f"{entry.guard_field}: guard {entry.name!r} appears more than once")
        chosen[entry.name] = action
    if group is not None:
        for member in _PII:
            chosen.setdefault(member, group)
    return GuardPolicy(
        [
            GuardRule(_instantiate(factories[name], f"{field}.{name}"), action)
            for name, action in chosen.items()
        ]
    )


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    action: object
    guard_field: str
    action_field: str


def _entries(spec: object, field: str) -> list[_Entry]:
    """The entries of either spec shape, each with the field paths its errors name."""
    if isinstance(spec, Mapping):
        out: list[_Entry] = []
        for key, action in spec.items():
            if not isinstance(key, str) or not key:
                raise GuardConfigError(f"{field}: guard names must be non-empty strings, got {key!r}")
            out.append(_Entry(key, action, f"{field}.{key}", f"{field}.{key}"))
        return out
    if isinstance(spec, Sequence) and not isinstance(spec, str | bytes):
        out = []
        for index, item in enumerate(spec):
            where = f"{field}[{index}]"
            if not isinstance(item, Mapping):
                raise GuardConfigError(f"{where}: expected a mapping with 'guard' and 'action'")
            unknown = sorted(str(key) for key in item if key not in ("guard", "action"))
            if unknown:
                raise GuardConfigError(f"{where}.{unknown[0]}: unknown field (expected guard, action)")
            name = item.get("guard")
            if not isinstance(name, str) or not name:
                raise GuardConfigError(f"{where}.guard: required, the name of a guard")
            if "action" not in item:
                raise GuardConfigError(f"{where}.action: required, one of flag, redact, block")
            out.append(_Entry(name, item["action"], f"{where}.guard", f"{where}.action"))
        return out
    raise GuardConfigError(f"{field}: expected a mapping of guard to action, or a list of {{guard, action}}")


def _instantiate(factory: GuardFactory, field: str) -> Guard:
    guard = factory if isinstance(factory, Guard) else factory()
    if not isinstance(guard, Guard):
        raise GuardConfigError(f"{field}: the registry entry did not make a Guard")
    return guard


__all__ = [
    "GuardFactory",
    "GuardConfigError",
    "GuardOutcome",
    "GuardPolicy",
    "GuardRule",
    "Hit",
    "PII_GROUP",
    "build_policy",
    "parse_action",
    "redaction_marker",
]

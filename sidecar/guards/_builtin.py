"""The built-in guards: prompt injection on input; PII and secret-shaped strings on output.

Every regex is precompiled, uses bounded quantifiers only and no nested ambiguous
repetition, so a scan is linear in the text and a match has a known longest length.
Look-behinds are negative and never exclude whitespace (see `_guards_base` on streaming).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from sidecar.guards._base import Category, Guard, GuardScan, Match, Pattern, RegexGuard

_I = re.IGNORECASE


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a string of digits (separators already removed)."""
    if not digits.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


# ---------------------------------------------------------------------------- injection
# a separator between words: tolerant of extra whitespace and punctuation, still bounded
_S = r"\W{1,8}"
_ANY_WORD = r"\w{1,24}" + _S
_LATER = r"(?:previous|prior|above|earlier|preceding|former|initial|original|system|developer|safety)"
_TARGET = (
    r"(?:instructions?|prompts?|rules|directions|directives|guidelines|guardrails|commands|context|"
    r"messages?|constraints)"
)
_IGNORE = ("ignore", "disregard", "forget", "override", "bypass", "skip")
_MODES = ("dan", "developer", "god", "jailbreak")
_REVEAL = ("reveal", "show", "print", "display", "output", "repeat", "leak", "dump", "tell", "give", "what")
# (regex, trigger words): a regex runs only when one of its words is in the text
_INJECTION: list[tuple[str, tuple[str, ...]]] = [
    # ignore / disregard (all|any|the ...) previous|prior|above ... instructions
    (
        rf"\b(?:ignore|disregard|forget|override|bypass|skip){_S}(?:(?:all|any|every|each|the|your|my|of|these|"
        rf"those|{_LATER[3:-1]}){_S}){{0,4}}{_LATER}{_S}(?:{_ANY_WORD})?{_TARGET}\b",
        _IGNORE,
    ),
    # disregard ... system prompt
    (
        rf"\b(?:disregard|ignore|forget|override|bypass){_S}(?:{_ANY_WORD}){{0,5}}?(?:system|developer|hidden)"
        rf"{_S}(?:prompt|message|instructions?)\b",
        _IGNORE,
    ),
    # you are now DAN / in developer mode / jailbroken
    (
        rf"\byou{_S}are{_S}now{_S}(?:in{_S})?(?:an?{_S})?(?:DAN|developer{_S}mode|god{_S}mode|jailbroken|"
        rf"unrestricted|unfiltered|uncensored|evil)\b",
        ("you",),
    ),
    (
        rf"\b(?:DAN|developer|god|jailbreak){_S}mode{_S}(?:is{_S})?(?:now{_S})?(?:enabled|activated|on|engaged)\b",
        _MODES,
    ),
    (
        rf"\b(?:enable|activate|enter|switch{_S}to){_S}(?:the{_S})?(?:DAN|developer|god|jailbreak){_S}mode\b",
        _MODES,
    ),
    (rf"\bdo{_S}anything{_S}now\b", ("anything",)),
    # reveal / print your system prompt
    (
        rf"\b(?:reveal|show|print|display|output|repeat|leak|dump|tell{_S}me|give{_S}me|what{_S}(?:is|are|was|were)"
        rf"|what's){_S}(?:{_ANY_WORD}){{0,3}}?(?:system|initial|hidden|secret|original|developer){_S}"
        rf"(?:prompt|instructions?|message)s?\b",
        _REVEAL,
    ),
    # print / repeat the (text|words) above
    (
        rf"\b(?:print|repeat|output|echo|display|show|copy|return){_S}(?:{_ANY_WORD}){{0,3}}?above\b",
        ("above",),
    ),
    # role-tag smuggling (literal first characters: fast without a trigger)
    (r"<\s{0,3}/?\s{0,3}(?:system|assistant|developer|user)\s{0,3}>", ()),
    (
        r"<\|\s{0,3}(?:im_start|im_end|im_sep|system|assistant|user|endoftext|eot_id|start_header_id|"
        r"end_header_id|begin_of_text)\s{0,3}\|>",
        (),
    ),
    (r"\[/?\s{0,3}(?:INST|SYS)\s{0,3}\]", ()),
    (r"<</?\s{0,3}SYS\s{0,3}>>", ()),
]


class InjectionGuard(RegexGuard):
    """Common prompt-injection phrasings and chat-template tags smuggled into input."""

    def __init__(self, name: str = Category.PROMPT_INJECTION) -> None:
        super().__init__(
            name=name,
            category=Category.PROMPT_INJECTION,
            scans="input",
            patterns=[
                Pattern(re.compile(regex, _I), max_len=400, ws_lead=400, trigger=trigger)
                for regex, trigger in _INJECTION
            ],
        )


# Output patterns put their look-behind after the first character, so that the regex
# engine can skip ahead to a literal or character-class prefix instead of trying every
# position (a 4 KB reply scans in tens of microseconds per pattern).

# ---------------------------------------------------------------------------- email
_LOCAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")
_DOMAIN = re.compile(r"[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LOCAL_MAX = 64


def _email_ok(local: str, domain: str) -> bool:
    labels = domain.split(".")
    return (
        not local.startswith(".")
        and not local.endswith(".")
        and ".." not in local
        and all(_LABEL.fullmatch(label) for label in labels)
        and labels[-1].isalpha()
        and len(labels[-1]) >= 2
    )


class EmailGuard(RegexGuard):
    """Email addresses (ASCII local part and domain, alphabetic top-level domain).

    Anchored on ``@``: the local part is the run of address characters right before it
    (1-64, not preceded by another word character), the domain the labels right after.
    """

    def __init__(self, name: str = Category.PII_EMAIL) -> None:
        super().__init__(
            name=name,
            category=Category.PII_EMAIL,
            scans="output",
            patterns=[Pattern(_DOMAIN, max_len=_LOCAL_MAX + 1 + 9 * 64)],
        )

    def scan(self, text: str) -> GuardScan:
        matches: list[Match] = []
        regions: list[tuple[int, int]] = []
        last_end = 0
        at = text.find("@")
        while at >= 0:
            start = at
            while start > 0 and at - start <= _LOCAL_MAX and text[start - 1] in _LOCAL_CHARS:
                start -= 1
            domain = _DOMAIN.match(text, at + 1)
            plausible = (
                0 < at - start <= _LOCAL_MAX
                and start >= last_end
                and domain is not None
                and not (start > 0 and (text[start - 1].isalnum() or text[start - 1] == "_"))
            )
            if plausible and domain is not None:
                end = domain.end()
                regions.append((start, end))
                if _email_ok(text[start:at], domain.group()):
                    matches.append(Match(self.category, start, end))
                last_end = end
            at = text.find("@", at + 1)
        return GuardScan(matches, regions)


# ---------------------------------------------------------------------------- phone
_NOT_AFTER = r"(?![\w-]|[.,]\d)"
# international: +CC then either compact (E.164) or groups that need separators
_PHONE_PLUS = re.compile(
    r"\+(?<![\w+.-]\+)[1-9]"
    r"(?:\d{6,14}|\d{0,3}(?:[ .-]?\(\d{1,5}\)[ .-]?\d{1,6})?(?:[ .-]\d{1,6}){1,6})" + _NOT_AFTER
)
# NANP: (415) 555-2671, 415-555-2671, 415.555.2671, 1 415 555 2671 (separators required);
# the first character is consumed, then looked at, so the engine can skip to candidates
_PHONE_NANP = re.compile(
    r"[(1-9](?<![\w+.-][(1-9])"
    r"(?:(?<=1)[ .-](?:\([2-9]\d{2}\)[ .-]?|[2-9]\d{2}[ .-])|(?<=\()[2-9]\d{2}\)[ .-]?|(?<=[2-9])\d{2}[ .-])"
    r"[2-9]\d{2}[ .-]\d{4}" + _NOT_AFTER
)
# European national formats with a trunk 0: 020 7946 0958, 06 12 34 56 78, 030 1234567
_PHONE_NATIONAL = re.compile(r"0(?<![\w+.-]0)\d{1,4}(?:[ .-]\d{2,8}){1,4}" + _NOT_AFTER)


def _digit_count(low: int, high: int) -> Callable[[str], bool]:
    def accept(text: str) -> bool:
        return low <= len(_digits(text)) <= high

    return accept


class PhoneGuard(RegexGuard):
    """Phone numbers: E.164 and +CC with separators, NANP and European national formats.

    Bare digit runs (order numbers, ids) never match: a number needs a leading ``+`` or
    separators, and a plausible digit count.
    """

    def __init__(self, name: str = Category.PII_PHONE) -> None:
        super().__init__(
            name=name,
            category=Category.PII_PHONE,
            scans="output",
            patterns=[
                Pattern(_PHONE_PLUS, max_len=40, ws_lead=40, accept=_digit_count(8, 15)),
                Pattern(_PHONE_NANP, max_len=20, ws_lead=20),
                Pattern(_PHONE_NATIONAL, max_len=40, ws_lead=40, accept=_digit_count(9, 13)),
            ],
        )


# ---------------------------------------------------------------------------- cards
# 13-19 digits, optional single space or dash between any two; major networks start 2-6
_CARD = re.compile(r"[2-6](?<![\w.+-][2-6])\d(?:[ -]?\d){11,17}" + _NOT_AFTER)


def _card_ok(text: str) -> bool:
    return luhn_valid(_digits(text))


class CardGuard(RegexGuard):
    """Payment card numbers: 13-19 digits, optionally grouped, that pass the Luhn check."""

    def __init__(self, name: str = Category.PII_CARD) -> None:
        super().__init__(
            name=name,
            category=Category.PII_CARD,
            scans="output",
            patterns=[Pattern(_CARD, max_len=37, ws_lead=37, accept=_card_ok)],
        )


# ---------------------------------------------------------------------------- national ids
# US SSN AAA-GG-SSSS (or with spaces)
_SSN = re.compile(r"\d(?<![\w-]\d)\d{2}([- ])\d{2}\1\d{4}" + _NOT_AFTER)


def _ssn_ok(text: str) -> bool:
    # never issued: area 000, 666 or 900-999; group 00; serial 0000
    area, group, serial = text[0:3], text[4:6], text[7:11]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


# UK National Insurance number: two letters (neither D F I Q U V, the second not O, and
# not BG GB KN NK NT TN ZZ), six digits, suffix A-D; spaces allowed between the pairs
_NINO = re.compile(r"[A-CEGHJ-PR-TW-Z](?<!\w[A-Z])[A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D](?!\w)")
_NINO_NEVER = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})


def _nino_ok(text: str) -> bool:
    return text[:2] not in _NINO_NEVER


class NationalIdGuard(RegexGuard):
    """National identity numbers: US Social Security numbers and UK NI numbers."""

    def __init__(self, name: str = Category.PII_NATIONAL_ID) -> None:
        super().__init__(
            name=name,
            category=Category.PII_NATIONAL_ID,
            scans="output",
            patterns=[
                Pattern(_SSN, max_len=11, ws_lead=11, accept=_ssn_ok),
                Pattern(_NINO, max_len=13, ws_lead=13, accept=_nino_ok),
            ],
        )


# ---------------------------------------------------------------------------- secrets
def _has_digit(text: str) -> bool:
    return any(c.isdigit() for c in text)


_PEM_BODY_MAX = 8192
_PEM_LABEL = r"-----(?:BEGIN|END) (?:[A-Z0-9]{1,12} ){0,3}PRIVATE KEY-----"
_PEM_HEADER = re.compile(_PEM_LABEL.replace("(?:BEGIN|END)", "BEGIN"))
_PEM_END = _PEM_LABEL.replace("(?:BEGIN|END)", "END")
# the whole block, up to its END line or, unterminated, to the end of the text
_PEM_BLOCK = re.compile(_PEM_HEADER.pattern + rf"[\s\S]{{0,{_PEM_BODY_MAX}}}?(?:{_PEM_END}|\Z)")


def _pem_hold(text: str, last_ws: int) -> int:
    # an unterminated block (the first BEGIN after the last END) is still growing
    end = text.rfind("-----END ")
    begin = text.find("-----BEGIN ", max(end, 0))
    if begin >= 0 and len(text) - begin <= _PEM_BODY_MAX + 2 * 64:
        return begin
    return max(0, len(text) - 64, last_ws - 64)


_SECRETS = [
    # OpenAI: sk-..., sk-proj-..., sk-svcacct-..., sk-admin-...
    Pattern(
        re.compile(r"sk-(?<![\w-]sk-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{32,256}"),
        max_len=270,
        accept=_has_digit,
    ),
    # AWS access key id
    Pattern(re.compile(r"A(?<![A-Za-z0-9]A)(?:KIA|SIA)[0-9A-Z]{16}"), max_len=20),
    # GitHub classic and fine-grained tokens
    Pattern(
        re.compile(r"g(?<!\wg)(?:h[pousr]_[A-Za-z0-9]{36,251}|ithub_pat_[A-Za-z0-9_]{22,244})"), max_len=255
    ),
    # Slack
    Pattern(re.compile(r"xox(?<![\w-]xox)[abprs]-[A-Za-z0-9-]{10,250}"), max_len=255),
    # Google API key
    Pattern(re.compile(r"AIza(?<![\w-]AIza)[0-9A-Za-z_-]{35}"), max_len=39),
    # JWT-shaped: base64url JSON header . base64url JSON payload . signature
    Pattern(
        re.compile(r"eyJ(?<![\w-]eyJ)[A-Za-z0-9_-]{5,1000}\.eyJ[A-Za-z0-9_-]{5,4000}\.[A-Za-z0-9_-]{0,1000}"),
        max_len=6010,
    ),
    # Authorization: Bearer <long opaque token> (one literal-prefixed regex per spelling is
    # several times faster than a [Bb] class)
    *(
        Pattern(
            re.compile(rf"{word}(?<![\w-]{word})[ \t]{{1,4}}[A-Za-z0-9._~+/=-]{{20,1024}}"),
            max_len=1034,
            ws_lead=10,
            accept=_has_digit,
        )
        for word in ("Bearer", "bearer", "BEARER")
    ),
    # PEM private keys: the header alone, and the whole block where it can be seen
    Pattern(_PEM_HEADER, max_len=64, ws_lead=64),
    Pattern(_PEM_BLOCK, max_len=_PEM_BODY_MAX + 2 * 64, ws_lead=_PEM_BODY_MAX + 2 * 64, hold=_pem_hold),
]


class SecretGuard(RegexGuard):
    """Secret-shaped strings: provider API keys, cloud and chat tokens, JWTs, bearer
    tokens and PEM private keys."""

    def __init__(self, name: str = Category.SECRET) -> None:
        super().__init__(name=name, category=Category.SECRET, scans="output", patterns=_SECRETS)


#: Factories of the built-in guards by their default names (which are their categories).
BUILTIN_GUARDS: Mapping[str, Callable[[], Guard]] = {
    Category.PROMPT_INJECTION: InjectionGuard,
    Category.PII_EMAIL: EmailGuard,
    Category.PII_PHONE: PhoneGuard,
    Category.PII_CARD: CardGuard,
    Category.PII_NATIONAL_ID: NationalIdGuard,
    Category.SECRET: SecretGuard,
}

__all__ = [
    "BUILTIN_GUARDS",
    "CardGuard",
    "EmailGuard",
    "InjectionGuard",
    "NationalIdGuard",
    "PhoneGuard",
    "SecretGuard",
    "luhn_valid",
]

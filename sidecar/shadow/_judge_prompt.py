"""Prompts for the blind judge and parsing of its verdicts: pure functions.

The prompt shows the user's conversation and the answers' content only, the pair in a
random order labelled "Answer A" and "Answer B"; system and developer messages are left
out (they are the version's prompt and would tell the versions apart). Parsing accepts the
verdict JSON alone, fenced or inside prose; a missing or out-of-range value is no verdict.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._compare import Answer

DEFAULT_RUBRIC = (
    "You are an impartial evaluator of an AI assistant's answers. Judge how well each answer "
    "serves the user in the conversation: correctness, helpfulness, relevance, completeness "
    "and safety. An answer may be text, tool calls the assistant decided to make, or both; "
    "judge whether the tool calls are the right ones with the right arguments. Ignore length "
    "for its own sake and the order in which answers are shown."
)
PAIR_INSTRUCTIONS = (
    'Reply with JSON only: {"score_a": <number 0..1>, "score_b": <number 0..1>, '
    '"preference": "A" | "B" | "tie"}'
)
SINGLE_INSTRUCTIONS = 'Reply with JSON only: {"score": <number 0..1>}'
MAX_VERDICT_CHARS = 16_000  # a verdict is a few dozen characters; longer answers are cut
MAX_OBJECT_STARTS = 64  # at most this many "{" in prose are tried as the start of the verdict
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_HIDDEN_ROLES = frozenset({"system", "developer"})


# --- prompts ---------------------------------------------------------------------------------


def render_answer(answer: Answer | str) -> str:
    """The content of an answer as the judge reads it: text, then any tool calls."""
    if isinstance(answer, str):
        return answer
    parts = [answer.text] if answer.text else []
    for call in answer.tool_calls:
        parts.append(f"Tool call: {call.name}({call.arguments_json})")
    if not answer.ok and not parts:
        parts.append("(no answer: the assistant failed)")
    return "\n".join(parts) if parts else "(empty answer)"


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        )
    return ""


def render_conversation(conversation: Sequence[Mapping[str, Any]]) -> str:
    """User, assistant and tool turns; system and developer turns (the version's) left out."""
    lines = []
    for message in conversation:
        role = str(message.get("role", ""))
        if role in _HIDDEN_ROLES:
            continue
        lines.append(f"{role}: {_content(message)}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class PairPrompt:
    messages: list[dict[str, str]]
    candidate_is_a: bool  # how to un-shuffle the verdict


def build_pair_prompt(
    conversation: Sequence[Mapping[str, Any]],
    candidate: Answer | str,
    stable: Answer | str,
    *,
    rubric: str = DEFAULT_RUBRIC,
    rng: random.Random,
) -> PairPrompt:
    """Both answers in a random order, labelled only "Answer A" and "Answer B"."""
    candidate_is_a = rng.random() < 0.5
    first, second = (candidate, stable) if candidate_is_a else (stable, candidate)
    user = (
        f"[Conversation]\n{render_conversation(conversation)}\n[End of Conversation]\n\n"
        f"[Answer A]\n{render_answer(first)}\n[End of Answer A]\n\n"
        f"[Answer B]\n{render_answer(second)}\n[End of Answer B]\n\n"
        f"{PAIR_INSTRUCTIONS}"
    )
    messages = [{"role": "system", "content": rubric}, {"role": "user", "content": user}]
    return PairPrompt(messages, candidate_is_a)


def build_single_prompt(
    conversation: Sequence[Mapping[str, Any]], answer: Answer | str, *, rubric: str = DEFAULT_RUBRIC
) -> list[dict[str, str]]:
    user = (
        f"[Conversation]\n{render_conversation(conversation)}\n[End of Conversation]\n\n"
        f"[Answer]\n{render_answer(answer)}\n[End of Answer]\n\n"
        f"{SINGLE_INSTRUCTIONS}"
    )
    return [{"role": "system", "content": rubric}, {"role": "user", "content": user}]


# --- parsing ---------------------------------------------------------------------------------


def _objects(text: str) -> list[dict[str, Any]]:
    """JSON objects in the text: the whole text, then fenced blocks, then any embedded in prose.
    Bounded (MAX_VERDICT_CHARS, MAX_OBJECT_STARTS) so a rambling judge costs little to parse."""
    text = text[:MAX_VERDICT_CHARS]
    candidates = [text.strip(), *(m.group(1).strip() for m in _FENCE.finditer(text))]
    found: list[dict[str, Any]] = []
    for chunk in candidates:
        try:
            value = json.loads(chunk)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(text) if ch == "{"][:MAX_OBJECT_STARTS]
    for i in starts:
        try:
            value, _ = decoder.raw_decode(text, i)
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def _score(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        return None  # out of range is unparsed: clamping would be guessing
    return float(value)


def parse_pair_verdict(text: str) -> tuple[float, float, str] | None:
    """(score_a, score_b, preference "A"|"B"|"tie") from the judge's answer, or None."""
    for obj in _objects(text):
        a, b = _score(obj.get("score_a")), _score(obj.get("score_b"))
        pref = obj.get("preference")
        if not isinstance(pref, str):
            continue
        pref = {"a": "A", "b": "B", "tie": "tie"}.get(pref.strip().lower(), "")
        if a is not None and b is not None and pref:
            return a, b, pref
    return None


def parse_single_verdict(text: str) -> float | None:
    for obj in _objects(text):
        score = _score(obj.get("score"))
        if score is not None:
            return score
    return None

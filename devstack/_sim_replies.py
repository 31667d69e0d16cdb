"""What a simulated model replies, given its behavior: a judge's scripted verdict on a judge
prompt, or the usual deterministic reply shaped by the behavior's candidate fields.

The judge reads the prompt format of `sidecar.shadow` (``[Answer A]`` ... ``[End of Answer A]``,
or one ``[Answer]``) without importing it, as a real judge model would only read the text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from ._sim_behavior import ModelBehavior
from ._sim_openai import ChatRequest, Reply, message_text, plan_reply, prompt_tokens, text_reply

_SECTION = re.compile(r"\[(Answer(?: [AB])?)\]\n(.*?)\n\[End of \1\]", re.DOTALL)
_NAMED_MODEL = re.compile(r"Simulated reply from ([^\s:,]+)")


def answer_score(answer: str, scores: Mapping[str, float], default: float) -> float:
    """The scripted score of one answer: that of the model its text names, else `default`."""
    match = _NAMED_MODEL.search(answer)
    return scores.get(match.group(1), default) if match else default


def judge_verdict(prompt: str, scores: Mapping[str, float], default: float) -> str | None:
    """The judge's JSON answer to a pair or single judge prompt; None if it is not one."""
    sections = dict(_SECTION.findall(prompt))
    if "Answer A" in sections and "Answer B" in sections:
        a = answer_score(sections["Answer A"], scores, default)
        b = answer_score(sections["Answer B"], scores, default)
        preference = "A" if a > b else "B" if b > a else "tie"
        return json.dumps({"score_a": a, "score_b": b, "preference": preference})
    if "Answer" in sections:
        return json.dumps({"score": answer_score(sections["Answer"], scores, default)})
    return None


def reply_for(req: ChatRequest, call_id: str, behavior: ModelBehavior) -> Reply:
    if behavior.judge:
        last = req.messages[-1]
        if last.get("role") == "user":
            verdict = judge_verdict(message_text(last), behavior.judge_scores, behavior.judge_default_score)
            if verdict is not None:
                return text_reply(verdict, prompt_tokens(req.messages), req.max_tokens)
    return plan_reply(
        req,
        call_id,
        tool_rename=behavior.tool_rename,
        ignore_tools=behavior.ignore_tools,
        reply_style=behavior.reply_style,
        reply_prefix=behavior.reply_prefix,
    )

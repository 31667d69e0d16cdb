"""Shadow comparison and LLM-as-judge: pure library modules the sidecar's shadow mode uses.

Nothing here imports the rest of `sidecar`; the caller plugs in its upstream client
(`CompleteFn`) and records the results (`Comparison` → ShadowRecord, `JudgeResult` → JudgeRecord).
"""

from ._compare import (
    DEFAULT_MIN_SIMILARITY,
    EMBEDDING_MEASURE,
    SIMILARITY_MEASURE,
    Answer,
    Comparison,
    DivergenceRule,
    EmbeddingError,
    ToolDecision,
    arguments_sha256,
    canonical_json,
    compare,
    cosine,
    embedding_cosine,
    text_similarity,
    tool_differences,
)
from ._judge import (
    CompleteFn,
    Completion,
    Judge,
    JudgeBudget,
    JudgeCallError,
    JudgeConfig,
    JudgeResult,
    JudgeStats,
    OpenAIChatCompletion,
)
from ._judge_prompt import (
    DEFAULT_RUBRIC,
    PairPrompt,
    build_pair_prompt,
    build_single_prompt,
    parse_pair_verdict,
    parse_single_verdict,
    render_answer,
    render_conversation,
)

__all__ = [
    "DEFAULT_MIN_SIMILARITY",
    "DEFAULT_RUBRIC",
    "EMBEDDING_MEASURE",
    "SIMILARITY_MEASURE",
    "Answer",
    "CompleteFn",
    "Comparison",
    "Completion",
    "DivergenceRule",
    "EmbeddingError",
    "Judge",
    "JudgeBudget",
    "JudgeCallError",
    "JudgeConfig",
    "JudgeResult",
    "JudgeStats",
    "OpenAIChatCompletion",
    "PairPrompt",
    "ToolDecision",
    "arguments_sha256",
    "build_pair_prompt",
    "build_single_prompt",
    "canonical_json",
    "compare",
    "cosine",
    "embedding_cosine",
    "parse_pair_verdict",
    "parse_single_verdict",
    "render_answer",
    "render_conversation",
    "text_similarity",
    "tool_differences",
]

"""The sidecar config's `shadow:` section: how much background work shadow mode may do.

shadow:
  queue_size: 64          # mirrored calls and judge jobs waiting; beyond it they are dropped
  concurrency: 4          # of them running at once
  max_tpm_share: 0.2      # of each global quota, for mirrored calls (never queued, refused first)
  deadline: 30s           # of one mirrored call, through the candidate's whole fallback chain
  max_busy: 0.9           # the event loop busy (on the CPU) more than this share of the time:
                          # shadow work is shed (reason overload) before user calls slow down
  divergence: {min_similarity: 0.6}   # which pairs count as divergent (and are always judged)
  judge:                  # optional: LLM-as-judge on any OpenAI-compatible provider
    base_url: https://api.openai.com/v1
    model: gpt-4o-mini
    api_key_env: JUDGE_API_KEY
    pair_sample: 0.1      # of mirrored pairs (divergent pairs always)
    evaluation_share: 0.01                 # continuous evaluation of production answers...
    evaluation_share_by_role: {canary: 0.15}   # ...per role, so a small canary is scored as often

Sending prompts and answers to a judge is content capture: the judge runs only when
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT is on, after the configured redaction.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from outrider.durations import PositiveDuration
from sidecar.shadow._compare import DivergenceRule
from sidecar.shadow._judge import JudgeConfig

DEFAULT_QUEUE_SIZE = 64
DEFAULT_CONCURRENCY = 4
DEFAULT_MAX_TPM_SHARE = 0.2
DEFAULT_DEADLINE_S = 30.0
DEFAULT_MAX_BUSY = 0.9


class ShadowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_size: int = Field(default=DEFAULT_QUEUE_SIZE, ge=1)
    concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1, le=256)
    max_tpm_share: float = Field(default=DEFAULT_MAX_TPM_SHARE, gt=0.0, le=1.0)
    deadline: PositiveDuration = DEFAULT_DEADLINE_S
    max_busy: float = Field(default=DEFAULT_MAX_BUSY, gt=0.0, le=1.0)
    divergence: DivergenceRule = Field(default_factory=DivergenceRule)
    judge: JudgeConfig | None = None

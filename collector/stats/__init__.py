"""Statistics for rollout decisions: always-valid sequential tests and fixed-horizon baselines.

The gates use the sequential tools (`confidence_sequence`, `CountEProcess`), which stay valid
when checked continuously; the fixed-horizon tests are for reports and benchmarks.
"""

from collector.stats._fixed import (
    fixed_horizon_n_means,
    fixed_horizon_n_proportions,
    holm,
    mann_whitney,
    two_proportion_ztest,
    welch_ttest,
)
from collector.stats._scales import (
    SCALE_WEIGHTS,
    scale_grid,
    scale_mixture_detectable_effect,
    scale_mixture_half_width,
)
from collector.stats._sequential import (
    DEFAULT_RATIOS,
    CountEProcess,
    Interval,
    confidence_sequence,
    msprt_half_width,
    normal_mixture_detectable_effect,
    proportion_difference_variance,
    ratio_mean_variance,
    samples_to_detect,
)

__all__ = [
    "DEFAULT_RATIOS",
    "SCALE_WEIGHTS",
    "CountEProcess",
    "Interval",
    "confidence_sequence",
    "fixed_horizon_n_means",
    "fixed_horizon_n_proportions",
    "holm",
    "mann_whitney",
    "msprt_half_width",
    "normal_mixture_detectable_effect",
    "proportion_difference_variance",
    "ratio_mean_variance",
    "samples_to_detect",
    "scale_grid",
    "scale_mixture_detectable_effect",
    "scale_mixture_half_width",
    "two_proportion_ztest",
    "welch_ttest",
]

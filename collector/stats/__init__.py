"""Statistics for rollout decisions: always-valid sequential tests and fixed-horizon baselines.

`_ab` holds A/B tests of 2 to 5 variants (planning, fixed-horizon and sequential analysis with a
winner under family-wise error control, and the sample-ratio-mismatch check), built on both.

The gates use the sequential tools (`confidence_sequence`, `CountEProcess`), which stay valid
when checked continuously; the fixed-horizon tests are for reports and benchmarks.
"""

from collector.stats._ab import (
    MAGNITUDE,
    PROPORTION,
    SRM_THRESHOLD,
    ABPlan,
    ABResult,
    Comparison,
    SampleRatioCheck,
    VariantStats,
    analyze_fixed,
    analyze_fixed_ranks,
    analyze_sequential,
    design_effect,
    plan_ab,
    sample_ratio_mismatch,
)
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
    "MAGNITUDE",
    "PROPORTION",
    "SCALE_WEIGHTS",
    "SRM_THRESHOLD",
    "ABPlan",
    "ABResult",
    "Comparison",
    "CountEProcess",
    "Interval",
    "SampleRatioCheck",
    "VariantStats",
    "analyze_fixed",
    "analyze_fixed_ranks",
    "analyze_sequential",
    "design_effect",
    "plan_ab",
    "sample_ratio_mismatch",
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

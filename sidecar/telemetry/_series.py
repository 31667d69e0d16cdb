"""Labelled Prometheus series, looked up once per label set.

`metric.labels(*values)` takes the metric's lock and checks every label each time; the
request path writes a few series on every call. A `SeriesCache` belongs to the object that
holds the metrics, so a metric it keys by identity lives as long as the cache. A series still
appears in /metrics on first use, as with `labels()`.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.metrics import MetricWrapperBase


class SeriesCache:
    """`cache(metric, *values)` is `metric.labels(*values)`, remembered."""

    __slots__ = ("_series",)

    def __init__(self) -> None:
        # bounded as the registry is: label sets are versions, models, upstreams, codes
        self._series: dict[tuple[int, tuple[str, ...]], Any] = {}

    def __call__(self, metric: MetricWrapperBase, *values: str) -> Any:
        key = (id(metric), values)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*values)
        return child

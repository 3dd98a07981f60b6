"""The PromQL metric-name tokenizer the dashboard tests rely on (tests/infra/promql.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "infra"))

from promql import label_values_names, metric_names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ("switchyard_decisions_total", {"switchyard_decisions_total"}),
        (
            'sum by (policy, model) (rate(switchyard_decisions_total{policy=~"$policy"}[5m]))',
            {"switchyard_decisions_total"},
        ),
        ("sum(rate(a_total[1m])) by (le) / ignoring(x) group_left(y, z) b", {"a_total", "b"}),
        (
            "histogram_quantile(0.99, sum by (le, envoy_cluster_name) (rate("
            'envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=~"($policy)/($model)"}'
            "[$__rate_interval])))",
            {"envoy_cluster_upstream_rq_time_bucket"},
        ),
        # Label values, replacements and regexes are strings, never names.
        (
            'label_replace(rate(x_total[1m]), "model", "$1", "from_model", "(sum|rate)")',
            {"x_total"},
        ),
        (
            "3600 * sum(rate(cost_total[1m])) > bool 1e-3 and on(policy) other_metric offset 5m",
            {"cost_total", "other_metric"},
        ),
        ('{__name__="by_name", job="x"}', {"by_name"}),
        ("max_over_time(g[5m:30s]) unless count without (instance) (h)", {"g", "h"}),
        ("vector(0) or time() - process_start_time_seconds", {"process_start_time_seconds"}),
        ("NaN + Inf + 0x1f + .5", set()),
        ("a:recording:rule", {"a:recording:rule"}),
        ("topk(5, sum by (code) (c))", {"c"}),
        ("sum without(le) (d) # a comment naming not_a_metric", {"d"}),
        ("${datasource_metric}", set()),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_an_unterminated_string_or_bracket_is_an_error() -> None:
    with pytest.raises(ValueError):
        metric_names('up{job="x}')
    with pytest.raises(ValueError):
        metric_names("rate(x[5m)")


def test_label_values_queries() -> None:
    query = 'label_values(envoy_cluster_membership_total{envoy_cluster_name=~"a/.+"}, name)'
    assert label_values_names(query) == {"envoy_cluster_membership_total"}
    assert label_values_names("label_values(policy)") == set()
    assert label_values_names("sum(x)") == {"x"}

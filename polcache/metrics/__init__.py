"""polcache.metrics: runtime records as in-process summaries, a rotated JSON-lines file for
the dashboard, and Prometheus text over a tiny HTTP endpoint."""

from polcache.metrics.http import serve_prometheus
from polcache.metrics.jsonl import JsonlWriter
from polcache.metrics.registry import Metrics
from polcache.metrics.session import collect_metrics

__all__ = ["JsonlWriter", "Metrics", "collect_metrics", "serve_prometheus"]

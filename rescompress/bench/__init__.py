"""Latency measurement and its provenance."""

from rescompress.bench.latency import LatencyStats, measure_latency, provenance

__all__ = ["LatencyStats", "measure_latency", "provenance"]

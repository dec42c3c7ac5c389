"""Evaluation stage: benchmarks, backends, the Ray actor runner, evaluators, contamination, reports."""

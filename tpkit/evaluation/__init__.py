"""Evaluation: one method registry (dense, ours, baselines), the runner that compares them on a
LLaVA-JSON dataset, speed and FLOPs, metrics, the report (tables, plots, overlays)."""

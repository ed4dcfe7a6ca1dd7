"""Deployment tools: CPU inference benchmarking against timm peers."""
from .bench import ModelSpec, benchmark, count_macs, format_markdown, measure, parse_spec

__all__ = ["ModelSpec", "benchmark", "count_macs", "format_markdown", "measure", "parse_spec"]

"""Deployment tools: CPU inference benchmarking against timm peers, model profiles."""
from .bench import ModelSpec, benchmark, format_markdown, measure, parse_spec

__all__ = ["ModelSpec", "benchmark", "format_markdown", "measure", "parse_spec"]

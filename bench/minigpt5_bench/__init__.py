"""Benchmarks that print one JSON object (`minigpt5-bench ...`; docs/BENCHMARKS.md).

Real architecture, random weights built directly on the target device: honest for speed, never for
quality. Modules here import torch lazily through the handlers registered in `args.py`.
"""

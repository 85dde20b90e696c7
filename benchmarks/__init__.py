"""Benchmarks that anyone can rerun: ``python -m benchmarks.cpu`` and ``benchmarks/gpu.sh`` (see BENCHMARKS.md)."""

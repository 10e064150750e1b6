"""Benchmarks of the worker against `vllm serve` and the bare engine: `make bench*` runs them as
``python -m bench.<name>``; each module says what it measures."""

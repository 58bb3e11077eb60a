"""Benchmarks: training throughput against an ANN step of the same network (python -m ndot.bench)
and the data path (python -m ndot.bench.data)."""

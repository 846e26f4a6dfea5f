"""Benchmarks: CPU and GPU timings of each stage and the projection of `make cv`."""

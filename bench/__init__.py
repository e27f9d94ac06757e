"""Benchmarks: the model zoo, the digits data set, latency runs and the demo."""

"""Read-only graph analyses: fake-tensor propagation, FLOPs/params, SQNR."""

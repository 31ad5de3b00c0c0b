"""Compute kernels. Each module holds the fast path and a plain PyTorch reference beside it."""

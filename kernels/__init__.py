"""Scan kernels: a readable reference beside each fast path, and a dispatcher."""

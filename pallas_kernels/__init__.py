"""Pallas kernels for kvjax: one folder per op with kernel, reference, ops."""

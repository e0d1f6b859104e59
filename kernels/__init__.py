"""Triton kernels and their pure-PyTorch references; no knowledge of models or graphs."""

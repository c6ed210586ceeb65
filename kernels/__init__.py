"""Chunked linear-attention kernels: torch (CPU) and Triton (GPU) with naive references.

Empty until the hybrid linear-attention layers land (issue 4).
"""

"""Applying a parallel Plan to a single-device model (meshes, FSDP2/DDP, DTensor TP, pipelining, EP).

Empty until the per-layer parallel runtime lands (issue 6).
"""

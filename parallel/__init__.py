"""Applying a parallel Plan to a single-device model, one parallelism per module.

`plan` (the format and its checks), `mesh` (every mesh a plan needs, built once, collectively),
`data_parallel` (ddp / zero2 / fsdp on FSDP2), `tensor_parallel` (DTensor plans per layer type),
`expert_parallel` (experts split over ranks, all-to-all dispatch), `relayout` (activations between
layers of different layouts), `pipeline` (stage modules, schedules), `grad_norm` (clipping across
meshes) and `runtime` (`parallelize`: all of them, per layer, as a plan says).
"""

"""Compute devices: CPU, CUDA and meta devices and their streams (device), data parallelism over torch.distributed
(distributed), the kernels' start-up check (canary). Imports models.ops and the kernels."""

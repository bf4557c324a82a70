"""horizon_triton.kernels: Triton kernels (one family per file), their torch references (reference.py) and
the CPU AdamW kernel (cpu_adam.py). Importing this package imports no kernel module and touches no GPU."""

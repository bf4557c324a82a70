"""The command line (``horizon-triton``, ``python -m horizon_triton.cli``): the subcommands, the run directory
(rundir) and the metrics' plots and TensorBoard (reporting). May import everything; nothing imports it."""
from .app import Progress, main

__all__ = ["Progress", "main"]

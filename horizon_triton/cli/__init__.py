"""The command line (``horizon-triton``, ``python -m horizon_triton.cli``): the subcommands (app), the run directory
(rundir) and the metrics' plots and TensorBoard (reporting). May import every package; nothing imports it."""
from .app import Progress, main

__all__ = ["Progress", "main"]

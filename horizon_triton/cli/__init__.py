"""The command line (``horizon-triton``, ``python -m horizon_triton.cli``): the parser (app), one module a
subcommand (train, data, plan), what a run shows and records (progress), its output directory (rundir) and plots
(reporting). May import every package; nothing imports it."""
from .app import main
from .progress import Progress

__all__ = ["Progress", "main"]

"""``python -m horizon_triton.cli`` (torchrun starts the ranks this way)."""
import sys

from .app import main

sys.exit(main())

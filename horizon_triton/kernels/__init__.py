"""horizon_triton.kernels: Triton kernels (one family per file), their torch references (reference.py) and
the CPU AdamW kernel (cpu_adam.py). Importing this package imports no kernel module and touches no GPU.

The sources live in the repository's top-level ``kernels/`` folder, which has no ``__init__.py`` on purpose: a
script or ``python -m pytest`` started from the repository root puts the root first on ``sys.path``, and a regular
package there would shadow the ``kernels`` package that transformers imports. In a source checkout (editable
install) this file adds that folder to the package's path; an installed wheel holds the modules here instead."""
from pathlib import Path

_checkout = Path(__file__).resolve().parents[2]
if (_checkout / "pyproject.toml").is_file():     # a source checkout, not site-packages (whose kernels/ is not ours)
    __path__.append(str(_checkout / "kernels"))

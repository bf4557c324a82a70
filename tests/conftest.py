"""Test-wide setup. Triton's interpreter must be chosen before any module defining a kernel is imported.

The kernel tests run in the interpreter on CPU by default; `TRITON_INTERPRET=0 pytest tests/test_<family>.py` on a
machine with a GPU runs the same checks on compiled kernels (their tensors are created on the ``dev`` fixture)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def dev() -> torch.device:
    """Where the kernels run: the CPU interpreter (this suite's default), or the GPU when TRITON_INTERPRET=0 is
    set on a machine with one. The GPU is looked for here, when a test asks, never at import."""
    from horizon_triton.kernels import tuning
    if tuning.interpreting():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 but no GPU: the kernels cannot run")
    return torch.device("cuda")

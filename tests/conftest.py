"""Test-wide setup. Triton's interpreter must be chosen before any module defining a kernel is imported.

The kernel tests run in the interpreter on CPU by default; `TRITON_INTERPRET=0 pytest tests/test_<family>.py` on a
machine with a GPU runs the same checks on compiled kernels (their tensors are created on the ``dev`` fixture)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402


def _version(text: str) -> tuple[int, int]:
    return tuple(int(part) for part in text.split(".")[:2])


def _interpreter_loop_bounds_for_numpy_2_4() -> None:
    """Triton < 3.7's interpreter turns a tensor used as a loop bound (``range(tl.cdiv(K, BLOCK))``) into a
    Python int with ``int(array)`` on a one-element array, which numpy ≥ 2.4 rejects ("only 0-dimensional arrays
    can be converted to Python scalars"). The GPU machine pairs triton 3.6 with numpy 2.5, so there the tensor's
    ``__index__`` is reset, after Triton patches it, to convert the array's single element. Tests only; the
    compiled kernels never meet this code."""
    import numpy
    import triton
    if _version(triton.__version__) >= (3, 7) or _version(numpy.__version__) < (2, 4):
        return
    from triton.runtime import interpreter
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_scalar_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_tensor_with_scalar_index


if os.environ["TRITON_INTERPRET"] == "1":
    _interpreter_loop_bounds_for_numpy_2_4()


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

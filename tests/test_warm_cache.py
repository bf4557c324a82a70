"""perf/warm_cache.py: Triton's cache filled for sm_90a on a machine without a GPU, keyed as the GPU's runtime keys.

Runs only with the GPU machine's triton (3.6, the twin venv: `bash .ci/gpu-twin tests/test_warm_cache.py`), whose
wheel ships ptxas. Each warming is a child process without the interpreter, as on the GPU. What these tests cannot
show without a GPU: that the driver loads the cubins, and that torch's CUDA tensors specialize as the fake ones do
(same dtypes; 16-byte alignment of a view = its byte offset's, since CUDA bases are 256-byte aligned)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parent.parent
CARRY_LIMIT_BYTES = 64 * 2 ** 20           # what the device tool carries to the GPU machine
WARM_SCRIPT = ROOT / "perf" / "warm_cache.py"

pytestmark = [
    pytest.mark.skipif(triton.__version__ != "3.6.0", reason=f"triton {triton.__version__}: the GPU machine's "
                       "cache needs its triton, 3.6 (run in the twin: bash .ci/gpu-twin tests/test_warm_cache.py)"),
    pytest.mark.skipif(not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists(),
                       reason="this triton build ships no ptxas: it cannot compile for sm_90a here"),
]


def warm(cache: Path, *args: str, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRITON_")}    # the interpreter's, above all
    return subprocess.run([sys.executable, str(WARM_SCRIPT), str(cache), *args], capture_output=True, text=True,
                          env={**base, "PYTHONPATH": str(ROOT), **env}, timeout=900, cwd=ROOT)


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_pass_finds_every_kernel_warming_compiled(tmp_path):
    """(a) warming writes a cubin per compiled kernel; (b) a fresh process replaying the same launches computes
    the same keys: Triton's compilation listener reports every one a cache hit, none compiled."""
    args = ("--sets", "canary", "--families", "rmsnorm,swiglu")
    first = result(warm(tmp_path, *args))
    assert first["compiled"] == 4 and first["cached"] == 0, first
    cubins = sorted(p.name for p in tmp_path.rglob("*.cubin"))
    assert cubins == sorted(f"{name}.cubin" for name in first["kernels"]), cubins
    metadata = [p for p in tmp_path.rglob("*.json") if not p.name.startswith("__grp__")]
    assert len(metadata) == first["compiled"]
    for path in metadata:                               # each entry was made for an H100's target
        assert json.loads(path.read_text())["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
    second = result(warm(tmp_path, *args))
    assert second["compiled"] == 0 and second["cached"] == first["compiled"], second
    assert second["kernels"] == first["kernels"]
    assert first["bytes"] < CARRY_LIMIT_BYTES


def test_refuses_an_environment_variable_that_changes_every_key(tmp_path):
    """TRITON_DEFAULT_FP_FUSION (set by tests/hopper_compile.py) is in each kernel's cache key: a cache warmed with
    it would miss on the GPU, so the script refuses before compiling anything."""
    proc = warm(tmp_path, "--sets", "canary", "--families", "rmsnorm", TRITON_DEFAULT_FP_FUSION="1")
    assert proc.returncode != 0 and "unset TRITON_DEFAULT_FP_FUSION" in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("*.cubin"))


@pytest.mark.slow
def test_everything_the_check_warms_fits_the_carry_limit(tmp_path):
    """(c) the default sets (the canary's 20 specializations at hd128 and the kernel benchmarks' shapes): every
    kernel compiled, and the folder within what the device tool carries."""
    first = result(warm(tmp_path))
    assert first["compiled"] >= 20 and first["cached"] == 0, first
    assert 0 < first["bytes"] < CARRY_LIMIT_BYTES, first["bytes"]
    print(f"warmed {first['compiled']} kernels, {first['bytes'] / 2 ** 20:.1f} MiB")

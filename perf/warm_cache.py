"""Fill Triton's cache for the GPU check (perf/gpu_check.sh) on a machine without a GPU, for an H100/H200 (sm_90a).

    PYTHONPATH=. <twin python> perf/warm_cache.py DIR [--sets canary,parts] [--families rmsnorm,swiglu] [--quick]

Run it with the triton the GPU machine has (3.6, the twin venv); carry DIR to the GPU machine (the device tool's
``carry``; .gitignore lists ``.triton-cache/``, the folder perf/gpu_check.sh uses when present).

Why the entries are found there: Triton 3.6 names a compiled kernel's cache folder by a hash of triton_key() (its
version and a hash of its own sources and libtriton: the same wheel, the same value), the kernel's source hash
(its ``cache_key``, the signature, the constexprs and the specialization attributes: 16-divisibility of pointers
and ints), the backend (the ptxas version of the wheel's bundled ptxas, the arch), the compile options (defaults
from the same wheel and the TRITON_* environment) and the cache-invalidating TRITON_* variables. Nothing of it is
the GPU, its driver or the CUDA runtime. So each launch is replayed through the JIT's own path
(``JITFunction.run`` with ``warmup=True``: the same binder, specialization and key, no launch) under a stand-in
driver that reports ``GPUTarget("cuda", 90, 32)``, on fake CUDA tensors (torch's FakeTensorMode: the device is
"cuda", no memory, data_ptr() = the view's byte offset from a 0 base, so alignment is what a CUDA allocation,
256-byte aligned, gives). The launchers run their real code (shape checks, config choice, grids), with
torch.cuda's device queries answered as an H100 SXM would (capability 9.0, 132 SMs).

Sets (what perf/gpu_check.py's parts launch first, bf16):
    canary  the start-up canary at head dim 128 (horizon_triton/devices/canary.py; the engine parts with our
            kernels run it before their first step), every dense family, or ``--families``
    parts   the kernel benchmarks (perf/gpu_parts.py attention, rmsnorm_matmul, cross_entropy) at their shapes

Not warmed: the engine's first step at real widths (about as many specializations as the canary; its launches
need the whole engine on a device), the kernel tests, the MoE parts, and Triton's per-signature C launchers
(built by gcc on the GPU machine at a kernel's first launch).
Prints {"compiled": n, "cached": n, "kernels": {name: n}, "bytes": size of DIR} as the last line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
H100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                       total_memory=80 * 2 ** 30)
SETS = ("canary", "parts")
TRITON_VERSION = "3.6.0"          # the GPU machine's; another version keys (and compiles) differently


class StandInDriver:
    """What Triton's JIT asks the active driver before a warmup compile: the target, device and stream."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0


def check_toolchain() -> None:
    """Refuses (SystemExit) where this triton cannot make the GPU's cache entries."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("warm_cache.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    if triton.__version__ != TRITON_VERSION:
        raise SystemExit(f"warm_cache.py: triton {triton.__version__} here, {TRITON_VERSION} on the GPU machine: its "
                         "keys would differ; run it with the twin's python (/root/.cache/horizon-triton/gpu-twin)")
    if not bundled_ptxas().exists():
        raise SystemExit("warm_cache.py: this triton build ships no ptxas; it cannot compile for sm_90a")
    if os.environ.get("TRITON_PTXAS_PATH"):
        raise SystemExit("warm_cache.py: unset TRITON_PTXAS_PATH: the GPU machine compiles with the wheel's ptxas")
    keyed = get_cache_invalidating_env_vars()
    if keyed:        # e.g. TRITON_DEFAULT_FP_FUSION: part of every key, and the GPU check does not set them
        raise SystemExit(f"warm_cache.py: unset {', '.join(sorted(keyed))}: Triton puts them in every cache key")


def bundled_ptxas() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@contextlib.contextmanager
def sm90_without_gpu():
    """Inside: Triton compiles for sm_90a and launches nothing; new tensors are fake (device "cuda", no memory);
    torch.cuda's device queries answer as an H100 SXM."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return run(self, *args, grid=grid, warmup=True, **kwargs)
    saved = {name: getattr(torch.cuda, name) for name in
             ("get_device_capability", "get_device_properties", "get_device_name", "current_device")}
    driver.set_active(StandInDriver(GPUTarget("cuda", 90, 32)))
    JITFunction.run = compile_only
    torch.cuda.get_device_capability = lambda device=None: (H100.major, H100.minor)
    torch.cuda.get_device_properties = lambda device=None: H100
    torch.cuda.get_device_name = lambda device=None: H100.name
    torch.cuda.current_device = lambda: 0
    try:
        with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
            warnings.simplefilter("ignore")       # FakeTensor.data_ptr()'s deprecation, the canary's verdicts
            yield
    finally:
        JITFunction.run = run
        with contextlib.suppress(RuntimeError):     # no CUDA driver here: the stand-in stays (nothing to launch)
            driver.reset_active()
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)


def canary_families(families: list[str] | None) -> list[str]:
    """``families`` checked against the canary's dense families (default: all of them)."""
    from horizon_triton.models.ops import KERNEL_FAMILY, MOE_FAMILIES
    known = [f for f in dict.fromkeys(KERNEL_FAMILY.values()) if f not in MOE_FAMILIES]
    unknown = sorted(set(families or ()) - set(known))
    if unknown:
        raise SystemExit(f"warm_cache.py --families: unknown {unknown}; the canary's dense families: {known}")
    return families or known


def warm_canary(families: list[str], inputs) -> None:
    """The start-up canary's launches (bf16, head dim 128, no window; what the engine parts run first) on
    ``inputs``, the canary's CPU inputs (made outside the fake mode: their routing needs real values)."""
    import torch

    from horizon_triton.devices import canary
    from horizon_triton.models.ops import load_ops
    ops = load_ops("triton", "cuda")
    t = on_cuda(inputs)
    for family in families:
        with torch.no_grad():
            canary.run_family(ops, family, t)


def on_cuda(inputs: SimpleNamespace) -> SimpleNamespace:
    """A copy of ``inputs`` (nested namespaces of tensors and values) with every tensor moved to "cuda"."""
    import torch
    return SimpleNamespace(**{k: on_cuda(v) if isinstance(v, SimpleNamespace) else
                              v.to("cuda") if torch.is_tensor(v) else v for k, v in vars(inputs).items()})


def warm_parts(quick: bool) -> None:
    """perf/gpu_parts.py's kernel benchmarks: the Triton side of each, at the same shapes (bf16)."""
    import torch

    from horizon_triton.kernels import attention as at
    from horizon_triton.kernels import cross_entropy as ce
    from horizon_triton.kernels import rmsnorm_matmul as rm
    sys.path.insert(0, str(ROOT / "perf"))
    import gpu_parts
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    empty = lambda *shape, dtype=bf16: torch.empty(*shape, device=dev, dtype=dtype)  # noqa: E731
    for shape in gpu_parts.ATTENTION_SHAPES[quick]:
        B, S, Hq, Hkv, D = (shape[n] for n in ("B", "S", "Hq", "Hkv", "D"))
        q, k, v, do = empty(B, S, Hq, D), empty(B, S, Hkv, D), empty(B, S, Hkv, D), empty(B, S, Hq, D)
        o, lse = at.attention_forward(q, k, v, None, D ** -0.5)
        at.attention_backward(do, q, k, v, o, lse, None, D ** -0.5)
    T = gpu_parts.RMSNORM_MATMUL_TOKENS[quick]
    for _, H, N in gpu_parts.RMSNORM_MATMUL_PROJECTIONS[quick]:
        x, g, w = empty(T, H), empty(H), empty(N, H)
        y, rstd = rm.rmsnorm_matmul_forward(x, g, w, 1e-5)
        rm.rmsnorm_matmul_backward(empty(T, N), x, g, w, rstd, empty(N, H, dtype=torch.float32),
                                   empty(H, dtype=torch.float32))
    for T, H, V in gpu_parts.CROSS_ENTROPY_SHAPES[quick]:
        targets = torch.zeros(T, device=dev, dtype=torch.int64)
        ce.linear_cross_entropy(empty(T, H), empty(V, H), targets, empty(V, H, dtype=torch.float32), 1.0 / T,
                                gpu_parts.CROSS_ENTROPY_CHUNK)


class CompileCounter:
    """Triton's compilation listener: each kernel compiled or found in the cache, by name."""

    def __init__(self):
        self.compiled: dict[str, int] = {}
        self.cached: dict[str, int] = {}

    def __call__(self, *, src, metadata, metadata_group, times, cache_hit):
        seen = self.cached if cache_hit else self.compiled
        seen[metadata["name"]] = seen.get(metadata["name"], 0) + 1


def warm(sets: list[str], families: list[str] | None = None, quick: bool = False) -> dict:
    """Compiles ``sets`` into $TRITON_CACHE_DIR -> {"compiled": n, "cached": n, "kernels": {name: n}}."""
    from triton import knobs
    import torch

    from horizon_triton.devices import canary
    check_toolchain()
    families = canary_families(families)
    inputs = canary.inputs(torch.bfloat16, torch.device("cpu"), 128, None)
    counter = CompileCounter()
    knobs.compilation.listener = counter
    try:
        with sm90_without_gpu():
            if "canary" in sets:
                warm_canary(families, inputs)
            if "parts" in sets:
                warm_parts(quick)
    finally:
        knobs.compilation.listener = None
    names = sorted(set(counter.compiled) | set(counter.cached))
    return dict(compiled=sum(counter.compiled.values()), cached=sum(counter.cached.values()),
                kernels={n: counter.compiled.get(n, 0) + counter.cached.get(n, 0) for n in names})


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache_dir", help="the Triton cache to fill (TRITON_CACHE_DIR on the GPU machine)")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--families", help="the canary's families only (comma-separated; default: all dense)")
    parser.add_argument("--quick", action="store_true", help="the parts' --quick shapes")
    args = parser.parse_args(argv)
    sets = [s for s in args.sets.split(",") if s]
    if not set(sets) <= set(SETS):
        parser.error(f"--sets: unknown {sorted(set(sets) - set(SETS))}; choose from {', '.join(SETS)}")
    cache = Path(args.cache_dir).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    # before triton reads them: the cache folder; no stored autotune choice (the GPU machine starts without one,
    # so its launches take each kernel's defaults)
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    os.environ["HORIZON_TUNING_CACHE"] = str(cache / "no-autotune.json")
    # the cubin and its metadata only, not every IR (a third of the bytes): what a cache hit loads; not in the key
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"
    result = warm(sets, args.families.split(",") if args.families else None, args.quick)
    result["bytes"] = folder_bytes(cache)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

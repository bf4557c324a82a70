"""Compile kernels for an H100 (sm_90a) on a machine without a GPU: the kernel tests' check that Triton's real
compiler accepts each kernel at its Hopper configs, and what it makes of it.

The interpreter checks what the kernels compute; it cannot see how they lower for Hopper (code the compiler
rejects, register spills, shared memory over an H100's 227 KB, tensor-core dots falling back from wgmma, loads
that are not software-pipelined). Triton's wheel ships ptxas and cuobjdump, so none of this needs a GPU.

- ``compile_sm90(fn, signature_types, constexprs, num_warps, num_stages)`` compiles one @triton.jit function
  and reads the cubin. It needs a process without TRITON_INTERPRET=1 (the interpreter replaces the compiler).
- ``report(test_module, function)`` is what a test calls: it runs ``function`` of tests/<test_module>.py, which
  compiles its family's kernels with compile_sm90 and returns {name: result}, in such a child process.
- ``assert_fits_without_spills(report)``: no register spills, shared memory within an H100's.

Each family's test (test_attention.py, test_cross_entropy.py, test_rmsnorm.py, test_rmsnorm_matmul.py,
test_swiglu.py, test_rope.py) owns the argument types and configs of its kernels and its own assertions.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

H100_SHARED_BYTES = 227 * 1024       # the most shared memory one block may use on an H100


def _nvidia_tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_sm90(fn, signature_types: dict, constexprs: dict, num_warps: int, num_stages: int,
                 aligned=None) -> dict:
    """``fn`` compiled for sm_90a with ``signature_types`` ({argument: "*bf16", "i32", "fp32", ...}) and
    ``constexprs`` ({argument: value}; together they name every argument of fn).

    ``aligned`` names the arguments that get the 16-divisibility hint the JIT gives aligned pointers and sizes
    at a launch on a model's shapes (default: every argument that is not fp32).

    -> {"registers": per thread, "spills": stack bytes (> 0 means register spills), "shared": bytes,
        "wgmma": Hopper tensor-core MMA instructions in the PTX, "pipelined": whether loads became async copies}
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    missing = [n for n in fn.arg_names if n not in signature_types and n not in constexprs]
    if missing:
        raise ValueError(f"compile_sm90 {fn.__name__}: no type or constexpr value for {missing}")
    if aligned is None:
        aligned = [n for n, t in signature_types.items() if t != "fp32"]
    signature = {n: signature_types.get(n, "constexpr") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
    if not found:
        raise RuntimeError(f"compile_sm90 {fn.__name__}: no resource usage in cuobjdump's output: {usage[-300:]!r}")
    return {"registers": int(found.group(1)), "spills": int(found.group(2)), "shared": kernel.metadata.shared,
            "wgmma": kernel.asm["ptx"].count("wgmma.mma_async"),
            "pipelined": "async_copy_global_to_local" in kernel.asm["ttgir"]}


def report(test_module: str, function: str) -> dict:
    """``function()`` of tests/<test_module>.py run in a child process without the interpreter -> its
    {kernel name: compile_sm90 result}. Skips the calling test where this Triton build has no NVIDIA toolchain."""
    import pytest

    if not os.path.exists(_nvidia_tool("cuobjdump")):
        pytest.skip("this Triton build ships no NVIDIA toolchain (ptxas, cuobjdump)")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}   # fp fusion: the GPU default
    run = subprocess.run([sys.executable, __file__, test_module, function], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def assert_fits_without_spills(report: dict) -> None:
    """Every kernel of ``report`` spills no registers and fits an H100's shared memory."""
    for name, r in report.items():
        assert r["spills"] == 0, f"{name} spills on sm_90 ({r['registers']} registers, {r['spills']} B of stack)"
        assert r["shared"] <= H100_SHARED_BYTES, f"{name}: {r['shared']} B of shared memory > 227 KB"


if __name__ == "__main__":       # the child process of report(): python tests/hopper_compile.py MODULE FUNCTION
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("hopper_compile.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    import importlib
    module_name, function_name = sys.argv[1:3]
    print(json.dumps(getattr(importlib.import_module(module_name), function_name)()))

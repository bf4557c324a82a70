"""Compile kernels for an H100 (sm_90a) on a machine without a GPU: the kernel tests' check that Triton's real
compiler accepts each kernel at its Hopper configs, and what it makes of it.

The interpreter checks what the kernels compute; it cannot see how they lower for Hopper (code the compiler
rejects, register spills, shared memory over an H100's 227 KB, tensor-core dots falling back from wgmma, loads
that are not software-pipelined). Triton's wheel ships ptxas and cuobjdump, so none of this needs a GPU.

- ``compile_sm90(fn, signature_types, constexprs, num_warps, num_stages)`` compiles one @triton.jit function
  and reads the cubin. It needs a process without TRITON_INTERPRET=1 (the interpreter replaces the compiler).
- ``report(test_module, function)`` is what a test calls: it runs ``function`` of tests/<test_module>.py, which
  compiles its family's kernels with compile_sm90 and returns {name: result}, in such child processes: one per
  core, each compiling every n-th kernel ``function`` asks for (the order must not depend on the results).
- ``assert_fits_without_spills(report)``: no register spills, shared memory within an H100's.
- ``assert_hopper_mma(report)``: every dot became a Hopper warpgroup MMA (wgmma), none an mma.sync / FMA one.

Compiling is slow (seconds a kernel, far more where it spills), so within one pytest run every result is kept in
a temporary directory (and Triton's own cache with it): a kernel that two tests, or two families, compile with
the same source, types and config is compiled once (``HOPPER_COMPILE_RESULTS=DIR`` keeps them in DIR across runs:
one DIR per Triton version, since a result is keyed by the kernel's source, arguments and config; it names the
version that made it).

Each family's test (test_attention.py, test_cross_entropy.py, test_rmsnorm.py, test_rmsnorm_matmul.py,
test_swiglu.py, test_rope.py) owns the argument types and configs of its kernels and its own assertions.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

H100_SHARED_BYTES = 227 * 1024       # the most shared memory one block may use on an H100
_WORKER = "HOPPER_COMPILE_WORKER"    # "i/n": this child compiles the i-th of every n kernels asked for
_RESULTS = "HOPPER_COMPILE_RESULTS"  # the directory of kept results (one pytest run's)
_calls = 0
_run_dir: str | None = None          # this pytest run's temporary directory (made at the first report())


def _nvidia_tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_sm90(fn, signature_types: dict, constexprs: dict, num_warps: int, num_stages: int,
                 aligned=None) -> dict | None:
    """``fn`` compiled for sm_90a with ``signature_types`` ({argument: "*bf16", "i32", "fp32", ...}) and
    ``constexprs`` ({argument: value}; together they name every argument of fn).

    ``aligned`` names the arguments that get the 16-divisibility hint the JIT gives aligned pointers and sizes
    at a launch on a model's shapes (default: every argument that is not fp32).

    -> {"registers": per thread, "spills": stack bytes (> 0 means register spills), "shared": bytes,
        "wgmma": Hopper tensor-core MMA instructions in the PTX, "dots": tl.dot ops, "dots_not_wgmma": those
        that did not become warpgroup MMAs, "pipelined": whether loads became async copies, "triton": version};
    None where another child process of report() compiles this one.
    """
    global _calls
    missing = [n for n in fn.arg_names if n not in signature_types and n not in constexprs]
    if missing:
        raise ValueError(f"compile_sm90 {fn.__name__}: no type or constexpr value for {missing}")
    if aligned is None:
        aligned = [n for n, t in signature_types.items() if t != "fp32"]
    _calls += 1
    worker, workers = (int(x) for x in os.environ.get(_WORKER, "0/1").split("/"))
    if (_calls - 1) % workers != worker:
        return None
    key = hashlib.sha256(json.dumps([fn.cache_key, fn.__name__, signature_types, sorted(constexprs.items()),
                                     sorted(aligned), num_warps, num_stages], default=str).encode()).hexdigest()
    kept = os.path.join(os.environ[_RESULTS], key + ".json") if os.environ.get(_RESULTS) else None
    if kept and os.path.exists(kept):
        with open(kept) as f:
            return json.load(f)
    result = _compile(fn, signature_types, constexprs, num_warps, num_stages, aligned)
    if kept:
        with open(kept + ".tmp", "w") as f:
            json.dump(result, f)
        os.replace(kept + ".tmp", kept)
    return result


def _compile(fn, signature_types: dict, constexprs: dict, num_warps: int, num_stages: int, aligned) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

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
            "dots": len(_TTIR_DOT.findall(kernel.asm["ttir"])),
            "dots_not_wgmma": len(_TTIR_DOT.findall(kernel.asm["ttgir"])),
            "pipelined": "async_copy_global_to_local" in kernel.asm["ttgir"], "triton": triton.__version__}


_TTIR_DOT = re.compile(r"= tt\.dot ")     # a dot left as tt.dot in TTGIR lowers to mma.sync or FMA, not wgmma


def report(test_module: str, function: str) -> dict:
    """``function()`` of tests/<test_module>.py run in a child process without the interpreter -> its
    {kernel name: compile_sm90 result}. Skips the calling test where this Triton build has no NVIDIA toolchain."""
    import pytest

    global _run_dir
    if not os.path.exists(_nvidia_tool("cuobjdump")):
        pytest.skip("this Triton build ships no NVIDIA toolchain (ptxas, cuobjdump)")
    if _run_dir is None:                # HOPPER_COMPILE_RESULTS=DIR keeps them across runs instead
        _run_dir = os.environ.get(_RESULTS) or tempfile.mkdtemp(prefix="hopper_compile_")
        if not os.environ.get(_RESULTS):
            atexit.register(shutil.rmtree, _run_dir, True)
    workers = max(1, min(8, os.cpu_count() or 1))
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",   # fp fusion: the GPU default
           "TRITON_CACHE_DIR": os.path.join(_run_dir, "triton"), _RESULTS: _run_dir}
    merged = {}
    with tempfile.TemporaryDirectory() as logs:                  # files, not pipes: no child blocks on a full one
        outs = [(open(os.path.join(logs, f"{i}.out"), "w+"), open(os.path.join(logs, f"{i}.err"), "w+"))
                for i in range(workers)]
        children = [subprocess.Popen([sys.executable, __file__, test_module, function],
                                     env={**env, _WORKER: f"{i}/{workers}"}, stdout=out, stderr=err, text=True)
                    for i, (out, err) in enumerate(outs)]
        for child, (out, err) in zip(children, outs):
            child.wait(timeout=3600)
            out.seek(0), err.seek(0)
            text, errors = out.read(), err.read()
            out.close(), err.close()
            assert child.returncode == 0, errors[-4000:]
            for name, result in json.loads(text.strip().splitlines()[-1]).items():
                if result is not None:
                    merged[name] = result
    return merged


def assert_fits_without_spills(report: dict) -> None:
    """Every kernel of ``report`` spills no registers and fits an H100's shared memory."""
    problems = [f"{name}: {r['spills']} B of stack ({r['registers']} registers)" for name, r in report.items()
                if r["spills"]]
    problems += [f"{name}: {r['shared']} B of shared memory > 227 KB" for name, r in report.items()
                 if r["shared"] > H100_SHARED_BYTES]
    assert not problems, "on sm_90a (triton " + _versions(report) + "):\n" + "\n".join(problems)


def assert_hopper_mma(report: dict) -> None:
    """Every dot of every kernel of ``report`` became a Hopper warpgroup MMA (and there is at least one)."""
    problems = [f"{name}: {r['dots_not_wgmma']} of {r['dots']} dots not wgmma ({r['wgmma']} wgmma)"
                for name, r in report.items() if r["dots_not_wgmma"] or not r["wgmma"]]
    assert not problems, "on sm_90a (triton " + _versions(report) + "):\n" + "\n".join(problems)


def _versions(report: dict) -> str:
    return ", ".join(sorted({r.get("triton", "?") for r in report.values()}))


if __name__ == "__main__":       # the child process of report(): python tests/hopper_compile.py MODULE FUNCTION
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("hopper_compile.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    import importlib
    module_name, function_name = sys.argv[1:3]
    print(json.dumps(getattr(importlib.import_module(module_name), function_name)()))

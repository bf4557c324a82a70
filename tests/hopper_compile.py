"""Compile the RMSNorm / fused RMSNorm+matmul / SwiGLU / RoPE kernels for an H100 (sm_90a) without a GPU.

The interpreter checks what the kernels compute; it cannot see whether they lower for Hopper. This script asks
Triton's real compiler (with its bundled ptxas) for each kernel at its default GPU config and the largest
autotune candidates, with the 16-divisibility hints the JIT gives aligned arguments, and reports per kernel:
whether the GEMM loops are software-pipelined (async copies), whether they use wgmma, the shared memory, the
registers per thread and the stack bytes (register spills).

Run as a script (the kernels must be imported with TRITON_INTERPRET unset): prints one JSON object.
    python tests/hopper_compile.py
"""
from __future__ import annotations

import json
import os
import sys


def _compile(fn, types: dict, constexprs: dict, num_warps: int, num_stages: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # every pointer, stride and size aligned to 16, as in a launch on a model's shapes
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in types.items() if t != "fp32"}
    src = ASTSource(fn=fn, signature={**types, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ir = kernel.asm["ttgir"]
    regs, stack = _resource_usage(kernel.asm["cubin"])
    return {"shared_bytes": kernel.metadata.shared, "async_copies": ir.count("async_copy_global_to_local"),
            "wgmma": ir.count("ttng.warp_group_dot "), "registers": regs, "stack_bytes": stack}


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack bytes: > 0 means register spills) from the wheel's cuobjdump."""
    import re
    import subprocess
    import tempfile

    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups()
    return int(regs), int(stack)


def _gemm_types(names: list[str], dtype: str, fp32_ptrs=()) -> dict:
    types = {}
    for n in names:
        if n.endswith("_ptr"):
            types[n] = "*fp32" if n in fp32_ptrs else f"*{dtype}"
        else:
            types[n] = "i32"
    return types


def main() -> dict:
    from horizon_triton.kernels import rmsnorm, rmsnorm_matmul as rm, rope, swiglu

    report = {}
    gemms = {
        "fwd": (rm._rmsnorm_matmul_fwd_kernel, ("rstd_ptr",)),
        "dx": (rm._matmul_kernel, ()),
        "dw": (rm._rmsnorm_matmul_dw_kernel, ("rstd_ptr", "dw_ptr")),
    }
    for name, (fn, fp32_ptrs) in gemms.items():
        default = rm._HOPPER_DEFAULTS[f"rmsnorm_matmul_{name}"]
        tiles = {"default": default, **{label: tile for label, tile in (("128x256x64", rm._TILE_128x256),
                                                                        ("128x128x64", rm._TILE_128x128))
                                        if tile != default}}
        for label, cfg in tiles.items():
            types = _gemm_types(fn.arg_names[:len(fn.arg_names) - 6], "bf16", fp32_ptrs)  # 6 trailing constexprs
            meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
            meta.update(UPCAST=False, PRECISION="tf32")
            report[f"rmsnorm_matmul_{name}/bf16/{label}"] = _compile(fn, types, meta, cfg["num_warps"],
                                                                     cfg["num_stages"])
        cfg = rm._FP32_DEFAULT
        meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        meta.update(UPCAST=False, PRECISION="ieee")
        types = _gemm_types(fn.arg_names[:len(fn.arg_names) - 6], "fp32", fp32_ptrs)
        report[f"rmsnorm_matmul_{name}/fp32/default"] = _compile(fn, types, meta, cfg["num_warps"], cfg["num_stages"])
    # row kernels at the model shapes they meet: hidden 4096 and a 128 head dim (q/k norm)
    for H in (4096, 128):
        cfg = rmsnorm._default_config(H, 2)
        common = dict(ROWS=cfg["ROWS"], BLOCK_H=H)
        types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "rstd_ptr": "*fp32", "n_rows": "i32",
                 "H": "i32", "stride_x_row": "i32", "stride_y_row": "i32", "eps": "fp32"}
        report[f"rmsnorm_fwd/H{H}"] = _compile(rmsnorm._rmsnorm_fwd_kernel, types, common, cfg["num_warps"], 1)
        types = {"dy_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "rstd_ptr": "*fp32", "dx_ptr": "*bf16",
                 "dg_partial_ptr": "*fp32", "n_rows": "i32", "H": "i32", "stride_dy_row": "i32",
                 "stride_x_row": "i32", "stride_dx_row": "i32"}
        report[f"rmsnorm_bwd/H{H}"] = _compile(rmsnorm._rmsnorm_bwd_kernel, types, common, cfg["num_warps"], 1)
    types = {"gate_up_ptr": "*bf16", "h_ptr": "*bf16", "T": "i32", "I": "i32", "stride_gu_row": "i32",
             "stride_h_row": "i32"}
    report["swiglu_fwd"] = _compile(swiglu._swiglu_fwd_kernel, types, dict(ROWS=4, BLOCK_I=1024), 8, 1)
    types = {"dh_ptr": "*bf16", "gate_up_ptr": "*bf16", "d_gate_up_ptr": "*bf16", "T": "i32", "I": "i32",
             "stride_dh_row": "i32", "stride_gu_row": "i32", "stride_dgu_row": "i32"}
    report["swiglu_bwd"] = _compile(swiglu._swiglu_bwd_kernel, types, dict(ROWS=4, BLOCK_I=1024), 8, 1)
    types = {"x_ptr": "*bf16", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "n_heads": "i32", "HALF": "i32",
             "stride_x_t": "i32", "stride_x_h": "i32", "stride_cs_t": "i32"}
    report["rope/inverse"] = _compile(rope._rope_kernel, types, dict(INVERSE=True, HEADS=16, BLOCK_HALF=64), 4, 1)
    return report


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("hopper_compile.py: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    print(json.dumps(main()))

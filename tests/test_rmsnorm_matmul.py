"""kernels/rmsnorm_matmul.py in Triton's interpreter vs the torch reference; the reference backward vs autograd.

On a GPU machine `TRITON_INTERPRET=0 pytest tests/test_rmsnorm_matmul.py` runs the same checks on compiled kernels."""
import hopper_compile
import pytest
import torch
from kernel_checks import assert_within_reference_error, bf16_round_to_nearest, dry_run_autotune  # noqa: F401

from horizon_triton.kernels import rmsnorm_matmul
from horizon_triton.kernels.reference import linear_backward, linear_forward, rmsnorm_forward
from horizon_triton.kernels.rmsnorm_matmul import rmsnorm_matmul_backward_ref, rmsnorm_matmul_forward_ref

EPS = 1e-6
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def _inputs(T, H, N, dtype, dev):
    x = torch.randn(T, H, dtype=dtype, device=dev) * 3
    g = (1 + 0.3 * torch.randn(H, device=dev)).to(dtype)
    w = (torch.randn(N, H, device=dev) / H ** 0.5).to(dtype)
    dy = torch.randn(T, N, dtype=dtype, device=dev)
    return x, g, w, dy


def _run(fwd, bwd, x, g, w, dy, d_weight0, d_norm_weight0):
    y, rstd = fwd(x, g, w, EPS)
    d_weight, d_norm_weight = d_weight0.clone(), d_norm_weight0.clone()
    dx = bwd(dy, x, g, w, rstd, d_weight, d_norm_weight)
    return y, rstd, dx, d_weight, d_norm_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, H, N", [(37, 100, 130), (64, 72, 32), (1, 40, 7)])
def test_kernel_matches_reference(T, H, N, dtype, dev):
    x, g, w, dy = _inputs(T, H, N, dtype, dev)
    # accumulation into non-zero buffers
    d_weight0, d_norm_weight0 = torch.randn(N, H, device=dev), torch.randn(H, device=dev)
    fused = (rmsnorm_matmul.rmsnorm_matmul_forward, rmsnorm_matmul.rmsnorm_matmul_backward)
    ref = (rmsnorm_matmul_forward_ref, rmsnorm_matmul_backward_ref)
    out = _run(*fused, x, g, w, dy, d_weight0, d_norm_weight0)
    lowp = _run(*ref, x, g, w, dy, d_weight0, d_norm_weight0)
    ref32 = _run(*ref, x.float(), g.float(), w.float(), dy.float(), d_weight0, d_norm_weight0)
    for name, o, r, r32 in zip(("y", "rstd", "dx", "d_weight", "d_norm_weight"), out, lowp, ref32):
        assert_within_reference_error(o, r, r32, ATOL[dtype] * (1 + r32.abs().max().item()), name)


def test_rstd_is_the_rmsnorm_rstd(dev):
    x, g, w, _ = _inputs(37, 100, 130, torch.bfloat16, dev)
    _, rstd = rmsnorm_matmul.rmsnorm_matmul_forward(x, g, w, EPS)
    torch.testing.assert_close(rstd, rmsnorm_forward(x, g, EPS)[1], rtol=1e-5, atol=0)


def test_reference_backward_matches_autograd(dev):
    x, g, w, dy = _inputs(37, 100, 130, torch.float32, dev)
    for t in (x, g, w):
        t.requires_grad_(True)
    y, rstd = rmsnorm_matmul_forward_ref(x, g, w, EPS)
    y.backward(dy)
    d_weight, d_norm_weight = torch.zeros(130, 100, device=dev), torch.zeros(100, device=dev)
    with torch.no_grad():
        dx = rmsnorm_matmul_backward_ref(dy, x, g, w, rstd, d_weight, d_norm_weight)
    torch.testing.assert_close(dx, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_weight, w.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_norm_weight, g.grad, rtol=1e-4, atol=1e-4)


def test_reference_linear_backward_matches_autograd(dev):
    x = torch.randn(37, 100, requires_grad=True, device=dev)
    w = torch.randn(130, 100, requires_grad=True, device=dev)
    b = torch.randn(130, requires_grad=True, device=dev)
    dy = torch.randn(37, 130, device=dev)
    linear_forward(x, w, b).backward(dy)
    # accumulates onto what is there
    d_weight, d_bias = torch.ones(130, 100, device=dev), torch.ones(130, device=dev)
    with torch.no_grad():
        dx = linear_backward(dy, x, w, d_weight, d_bias)
    torch.testing.assert_close(dx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_weight - 1, w.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_bias - 1, b.grad, rtol=1e-5, atol=1e-5)


def test_clear_errors(dev):
    x, g, w, dy = _inputs(8, 16, 12, torch.float32, dev)
    f = rmsnorm_matmul.rmsnorm_matmul_forward
    with pytest.raises(ValueError, match=r"weight is \[12, 15\] but x has H=16"):
        f(x, g, w[:, :15], EPS)
    with pytest.raises(ValueError, match="flatten batch"):
        f(x[None], g, w, EPS)
    with pytest.raises(TypeError, match="cast the weight"):
        f(x, g, w.bfloat16(), EPS)
    with pytest.raises(ValueError, match="norm_weight shape"):
        f(x, g[:4], w, EPS)
    with pytest.raises(ValueError, match="contiguous"):
        f(x.t().contiguous().t(), g, w, EPS)
    _, rstd = f(x, g, w, EPS)
    b = rmsnorm_matmul.rmsnorm_matmul_backward
    with pytest.raises(ValueError, match="d_weight must be"):
        b(dy, x, g, w, rstd, torch.zeros(12, 16, dtype=torch.bfloat16, device=dev), torch.zeros(16, device=dev))
    with pytest.raises(ValueError, match="dy must be"):
        b(dy[:, :5], x, g, w, rstd, torch.zeros(12, 16, device=dev), torch.zeros(16, device=dev))
    with pytest.raises(ValueError, match="rstd must be"):
        b(dy, x, g, w, rstd.bfloat16(), torch.zeros(12, 16, device=dev), torch.zeros(16, device=dev))


def _gemm_types(names: list[str], dtype: str, fp32_ptrs=()) -> dict:
    return {n: ("*fp32" if n in fp32_ptrs else f"*{dtype}") if n.endswith("_ptr") else "i32" for n in names}


def _hopper_report() -> dict:
    """The three GEMM kernels compiled for sm_90 (tests/hopper_compile.py) at their default bf16 and fp32
    configs and the largest bf16 autotune tiles (child process of test_kernels_compile_for_hopper)."""
    from hopper_compile import compile_sm90
    rm = rmsnorm_matmul
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
            report[f"rmsnorm_matmul_{name}/bf16/{label}"] = compile_sm90(fn, types, meta, cfg["num_warps"],
                                                                         cfg["num_stages"])
        cfg = rm._FP32_DEFAULT
        meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
        meta.update(UPCAST=False, PRECISION="ieee")
        types = _gemm_types(fn.arg_names[:len(fn.arg_names) - 6], "fp32", fp32_ptrs)
        report[f"rmsnorm_matmul_{name}/fp32/default"] = compile_sm90(fn, types, meta, cfg["num_warps"],
                                                                     cfg["num_stages"])
    return report


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Triton's real compiler lowers every kernel for sm_90a; the bf16 GEMMs get wgmma and a cp.async pipeline,
    within an H100's 227 KB of shared memory, and the default configs spill no registers. (Speed itself needs
    the GPU: perf/test_rmsnorm_matmul_perf.py.)"""
    report = hopper_compile.report("test_rmsnorm_matmul", "_hopper_report")
    for name, r in report.items():
        assert r["shared"] <= hopper_compile.H100_SHARED_BYTES, f"{name}: {r['shared']} B of shared memory > 227 KB"
        if name.endswith("/default"):                                # other tiles may spill: timed
            assert r["spills"] == 0, f"{name}: spills ({r['registers']} registers, {r['spills']} B stack)"
        if "/bf16/" in name:                                         # fp32: IEEE dots on FMA units
            assert r["wgmma"] > 0, f"{name}: no wgmma in the compiled kernel"
            assert r["pipelined"], f"{name}: the K loop is not software-pipelined"


def test_autotune_dry_run(monkeypatch, tmp_path, dev):
    small = dict(GROUP_M=2, num_warps=4, num_stages=1)
    cands = [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, **small), dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, **small)]
    rows, stored = dry_run_autotune(monkeypatch, tmp_path, rmsnorm_matmul, "CANDIDATES", cands,
                                    dict(T=37, H=40, N=48), dev)
    assert [r["shape"]["kernel"] for r in rows] == ["rmsnorm_matmul_fwd", "rmsnorm_matmul_dx", "rmsnorm_matmul_dw"]
    assert all(r["config"] == cands[-1] and "TFLOPS" in r["throughput"] for r in rows)
    assert all(stored[r["shape"]["kernel"]]["T64_N48_H40_bfloat16"] == cands[-1] for r in rows)


def test_autotune_keys_are_the_keys_the_engine_asks_for():
    """The keys autotune stores (one per DEFAULT_SHAPES entry) are those a launch computes at the engine's token
    counts: 32K tokens and more land on the tuned 32K bucket, and every tuned T is its own bucket."""
    key = rmsnorm_matmul._shape_key
    tuned = {key(s["T"], s["N"], s["H"], torch.bfloat16) for s in rmsnorm_matmul.DEFAULT_SHAPES}
    assert all(key(s["T"], s["N"], s["H"], torch.bfloat16).startswith(f"T{s['T']}_")
               for s in rmsnorm_matmul.DEFAULT_SHAPES)
    for T in (32768, 40000, 65536, 131072):                 # Llama-3-8B qkv and gate_up at 32K+ tokens
        assert key(T, 6144, 4096, torch.bfloat16) in tuned
        assert key(T, 28672, 4096, torch.bfloat16) in tuned
    for T in (5000, 8192, 1500):
        assert key(T, 6144, 4096, torch.bfloat16) in tuned
    assert key(32768, 57344, 8192, torch.bfloat16) in tuned   # a 70B-width layer

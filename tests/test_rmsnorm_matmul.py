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


_GEMMS = {"fwd": ("_rmsnorm_matmul_fwd_kernel", ("rstd_ptr",)), "dx": ("_matmul_kernel", ()),
          "dw": ("_rmsnorm_matmul_dw_kernel", ("rstd_ptr", "dw_ptr"))}


def _compile_gemm(name: str, cfg: dict, dtype: str) -> dict:
    from hopper_compile import compile_sm90
    fn_name, fp32_ptrs = _GEMMS[name]
    fn = getattr(rmsnorm_matmul, fn_name)
    types = _gemm_types(fn.arg_names[:len(fn.arg_names) - 6], dtype, fp32_ptrs)   # 6 trailing constexprs
    meta = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
    meta.update(UPCAST=False, PRECISION="tf32" if dtype == "bf16" else "ieee")
    return compile_sm90(fn, types, meta, cfg["num_warps"], cfg["num_stages"])


def _hopper_report() -> dict:
    """The three GEMM kernels compiled for sm_90 (tests/hopper_compile.py) at their default bf16 and fp32
    configs (child process of test_defaults_compile_for_hopper)."""
    rm = rmsnorm_matmul
    report = {f"rmsnorm_matmul_{name}/bf16/default": _compile_gemm(name, rm._HOPPER_DEFAULTS[f"rmsnorm_matmul_{name}"],
                                                                   "bf16") for name in _GEMMS}
    report.update({f"rmsnorm_matmul_{name}/fp32/default": _compile_gemm(name, rm._FP32_DEFAULT, "fp32")
                   for name in _GEMMS})
    return report


def _hopper_candidates_report() -> dict:
    """Every bf16 candidate of each GEMM's autotune sweep (child process of test_candidates_compile_for_hopper)."""
    return {f"rmsnorm_matmul_{name}/bf16/{_label(cfg)}": _compile_gemm(name, cfg, "bf16")
            for name in _GEMMS for cfg in _triton_candidates(name)}


def _triton_candidates(gemm: str) -> list[dict]:
    """The sweep's Triton tiles for one GEMM (its torch choice compiles nothing of ours)."""
    return [c for c in rmsnorm_matmul.gemm_candidates(f"rmsnorm_matmul_{gemm}")
            if rmsnorm_matmul.implementation(c) == "triton"]


def _label(cfg: dict) -> str:
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"


@pytest.mark.slow
def test_defaults_compile_for_hopper():
    """Triton's real compiler lowers every GEMM's default (bf16 and fp32) for sm_90a without register spills,
    within an H100's 227 KB of shared memory; the bf16 dots are wgmma with a cp.async pipeline (fp32's IEEE dots
    have no tensor-core form). Speed itself needs the GPU: perf/test_rmsnorm_matmul_perf.py."""
    report = hopper_compile.report("test_rmsnorm_matmul", "_hopper_report")
    assert len(report) == 6
    hopper_compile.assert_fits_without_spills(report)
    bf16 = {name: r for name, r in report.items() if "/bf16/" in name}
    hopper_compile.assert_hopper_mma(bf16)
    assert all(r["pipelined"] for r in bf16.values()), bf16


@pytest.mark.slow
def test_candidates_compile_for_hopper():
    """No tile the GPU's autotune would compile spills or overflows an H100's shared memory."""
    report = hopper_compile.report("test_rmsnorm_matmul", "_hopper_candidates_report")
    assert len(report) == sum(len(_triton_candidates(n)) for n in _GEMMS)
    hopper_compile.assert_fits_without_spills(report)
    hopper_compile.assert_hopper_mma(report)


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


class _NotLaunched:
    """Stands in for a Triton GEMM kernel that must not be launched."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        raise AssertionError(f"{self.name} was launched")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_torch_choice_runs_cublas_and_matches_reference(monkeypatch, tmp_path, dtype, dev):
    """A GPU's autotune stored the torch (cuBLAS) choice for all three GEMMs: the launchers take it (no Triton GEMM
    runs) and match the reference within its rule; without the stored choice the Triton GEMMs run."""
    from horizon_triton.kernels import tuning
    monkeypatch.setenv("HORIZON_TUNING_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(tuning, "_cache", None)
    T, H, N = 37, 100, 130
    with tuning.device_named("NVIDIA H100 (stand-in)"):
        for gemm in _GEMMS:
            tuning.store_config(f"rmsnorm_matmul_{gemm}", rmsnorm_matmul._shape_key(T, N, H, dtype),
                                rmsnorm_matmul.TORCH)
    for kernel, _ in _GEMMS.values():
        monkeypatch.setattr(rmsnorm_matmul, kernel, _NotLaunched(kernel))
    x, g, w, dy = _inputs(T, H, N, dtype, dev)
    d_weight0, d_norm_weight0 = torch.randn(N, H, device=dev), torch.randn(H, device=dev)
    fused = (rmsnorm_matmul.rmsnorm_matmul_forward, rmsnorm_matmul.rmsnorm_matmul_backward)
    with pytest.raises(AssertionError, match="was launched"):       # the Triton path, where nothing is stored
        _run(*fused, x, g, w, dy, d_weight0, d_norm_weight0)
    with tuning.device_named("NVIDIA H100 (stand-in)"):
        out = _run(*fused, x, g, w, dy, d_weight0, d_norm_weight0)
    ref = (rmsnorm_matmul_forward_ref, rmsnorm_matmul_backward_ref)
    lowp = _run(*ref, x, g, w, dy, d_weight0, d_norm_weight0)
    ref32 = _run(*ref, x.float(), g.float(), w.float(), dy.float(), d_weight0, d_norm_weight0)
    for name, o, r, r32 in zip(("y", "rstd", "dx", "d_weight", "d_norm_weight"), out, lowp, ref32):
        assert_within_reference_error(o, r, r32, ATOL[dtype] * (1 + r32.abs().max().item()), name)


def test_autotune_stores_torch_where_it_is_fastest(monkeypatch, tmp_path, dev):
    """The sweep checks and times the torch choice with the Triton tiles; where it is the fastest (here: the only
    candidate left), each GEMM stores it and the row says which implementation won."""
    rows, stored = dry_run_autotune(monkeypatch, tmp_path, rmsnorm_matmul, "CANDIDATES", [],
                                    dict(T=37, H=40, N=48), dev)
    assert [r["implementation"] for r in rows] == ["torch"] * 3
    assert all(stored[r["shape"]["kernel"]]["T64_N48_H40_bfloat16"] == rmsnorm_matmul.TORCH for r in rows)

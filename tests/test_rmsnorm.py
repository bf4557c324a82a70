"""kernels/rmsnorm.py in Triton's interpreter vs the torch reference; the reference vs autograd and transformers.

On a GPU machine `TRITON_INTERPRET=0 pytest tests/test_rmsnorm.py` runs the same checks on compiled kernels."""
import hopper_compile
import pytest
import torch
from kernel_checks import assert_within_reference_error, bf16_round_to_nearest, dry_run_autotune  # noqa: F401

from horizon_triton.kernels import rmsnorm
from horizon_triton.kernels.rmsnorm import rmsnorm_backward_ref, rmsnorm_forward_ref

EPS = 1e-6
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def _inputs(shape, dtype, dev):
    x = torch.randn(shape, dtype=dtype, device=dev) * 2
    w = (1 + 0.3 * torch.randn(shape[-1], device=dev)).to(dtype)
    dy = torch.randn(shape, dtype=dtype, device=dev)
    return x, w, dy


def _run(fwd, bwd, x, w, dy, d_weight0):
    y, rstd = fwd(x, w, EPS)
    d_weight = d_weight0.clone()
    dx = bwd(dy, x, w, rstd, d_weight)
    return y, rstd, dx, d_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 100), (37, 4, 72), (3, 256), (5, 3, 5)], ids=str)
def test_kernel_matches_reference(shape, dtype, dev):
    x, w, dy = _inputs(shape, dtype, dev)
    d_weight0 = torch.randn(shape[-1], device=dev)  # accumulation into a non-zero buffer
    out = _run(rmsnorm.rmsnorm_forward, rmsnorm.rmsnorm_backward, x, w, dy, d_weight0)
    ref = _run(rmsnorm_forward_ref, rmsnorm_backward_ref, x, w, dy, d_weight0)
    ref32 = _run(rmsnorm_forward_ref, rmsnorm_backward_ref, x.float(), w.float(), dy.float(), d_weight0)
    atol = ATOL[dtype]
    for name, o, r, r32 in zip(("y", "rstd", "dx", "d_weight"), out, ref, ref32):
        assert_within_reference_error(o, r, r32, atol * (1 + r32.abs().max().item()), name)


def test_strided_rows_and_qk_norm_view(dev):
    """The engine norms q/k per head on a view into the fused qkv output."""
    qkv = torch.randn(37, 3, 4, 72, dtype=torch.bfloat16, device=dev)
    q = qkv[:, 0]                                                     # [T, nH, D], not contiguous
    w = torch.randn(72, dtype=torch.bfloat16, device=dev)
    y, rstd = rmsnorm.rmsnorm_forward(q, w, EPS)
    y_ref, rstd_ref = rmsnorm_forward_ref(q.contiguous(), w, EPS)
    assert y.shape == q.shape and rstd.shape == (37, 4)
    torch.testing.assert_close(rstd, rstd_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)


def test_reference_backward_matches_autograd(dev):
    x, w, dy = _inputs((37, 100), torch.float32, dev)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y, _ = rmsnorm_forward_ref(x, w, EPS)
    y.backward(dy)
    d_weight = torch.zeros(100, device=dev)
    with torch.no_grad():
        _, rstd = rmsnorm_forward_ref(x, w, EPS)
        dx = rmsnorm_backward_ref(dy, x.detach(), w.detach(), rstd, d_weight)
    torch.testing.assert_close(dx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_weight, w.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_transformers_llama_rmsnorm(dtype, dev):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = LlamaRMSNorm(100, eps=EPS).to(dev, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(100))
        x = torch.randn(37, 100, dtype=dtype, device=dev) * 2
        y_hf = norm(x)
        y_ref, _ = rmsnorm_forward_ref(x, norm.weight, EPS)
        y_kernel, _ = rmsnorm.rmsnorm_forward(x, norm.weight, EPS)
    assert y_hf.dtype == y_ref.dtype == dtype
    torch.testing.assert_close(y_ref, y_hf, rtol=0, atol=0)
    assert_within_reference_error(y_kernel, y_ref, y_hf.float(), 1e-5, "kernel vs LlamaRMSNorm")


def test_clear_errors(dev):
    x = torch.randn(4, 8, device=dev)
    w = torch.randn(8, device=dev)
    with pytest.raises(ValueError, match="weight shape"):
        rmsnorm.rmsnorm_forward(x, torch.randn(7, device=dev), EPS)
    with pytest.raises(TypeError, match="dtype"):
        rmsnorm.rmsnorm_forward(x.to(torch.int32), w, EPS)
    with pytest.raises(ValueError, match="non-empty"):
        rmsnorm.rmsnorm_forward(torch.empty(0, 8, device=dev), w, EPS)
    _, rstd = rmsnorm.rmsnorm_forward(x, w, EPS)
    with pytest.raises(ValueError, match="d_weight must be fp32"):
        rmsnorm.rmsnorm_backward(x, x, w, rstd, torch.zeros(8, dtype=torch.bfloat16, device=dev))
    with pytest.raises(ValueError, match="rstd must be fp32"):
        rmsnorm.rmsnorm_backward(x, x, w, rstd[:3], torch.zeros(8, device=dev))
    with pytest.raises(ValueError, match="dy shape"):
        rmsnorm.rmsnorm_backward(x[:3], x, w, rstd, torch.zeros(8, device=dev))


def test_autotune_dry_run(monkeypatch, tmp_path, dev):
    cands = [{"ROWS": 1, "num_warps": 1}, {"ROWS": 4, "num_warps": 2}]
    rows, stored = dry_run_autotune(monkeypatch, tmp_path, rmsnorm, "candidates", cands, dict(T=37, H=72), dev)
    assert [r["shape"]["kernel"] for r in rows] == ["rmsnorm_fwd", "rmsnorm_bwd"]
    assert all(r["config"] == cands[-1] and r["throughput"].endswith("GB/s") for r in rows)
    assert stored["rmsnorm_fwd"]["H72_bfloat16"] == stored["rmsnorm_bwd"]["H72_bfloat16"] == cands[-1]


def test_sweep_never_times_a_wrong_or_failing_candidate(monkeypatch, capsys):
    from horizon_triton.kernels import sweep, tuning
    monkeypatch.setattr(tuning, "time_ms", lambda fn, warmup=0, rep=0: (fn(), 1.0)[1])
    timed = []

    def check(cfg):
        if cfg["name"] == "fails":
            raise RuntimeError("out of resource: shared memory")
        return {"wrong": 0.5, "right": 1e-3}[cfg["name"]]
    best = sweep.fastest("k", [{"name": "fails"}, {"name": "wrong"}, {"name": "right"}], timed.append, check)
    assert best == ({"name": "right"}, 1.0) and timed == [{"name": "right"}]
    out = capsys.readouterr().out
    assert "out of resource" in out and "wrong result on this device" in out
    with pytest.raises(RuntimeError, match="no candidate"):
        sweep.fastest("k", [{"name": "wrong"}], timed.append, check)


def _hopper_report() -> dict:
    """Both kernels compiled for sm_90 (tests/hopper_compile.py) at their default config for the shapes they
    meet: hidden 4096 and a 128 head dim (q/k norm), bf16 and fp32; child process of
    test_kernels_compile_for_hopper."""
    from hopper_compile import compile_sm90
    report = {}
    for dt, elem_bytes in (("bf16", 2), ("fp32", 4)):
        for H in (4096, 128):
            cfg = rmsnorm._default_config(H, elem_bytes)
            common = dict(ROWS=cfg["ROWS"], BLOCK_H=H)
            types = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": f"*{dt}", "rstd_ptr": "*fp32", "n_rows": "i32",
                     "H": "i32", "stride_x_row": "i32", "stride_y_row": "i32", "eps": "fp32"}
            report[f"rmsnorm_fwd/H{H}/{dt}"] = compile_sm90(rmsnorm._rmsnorm_fwd_kernel, types, common,
                                                            cfg["num_warps"], 1)
            types = {"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "rstd_ptr": "*fp32",
                     "dx_ptr": f"*{dt}", "dg_partial_ptr": "*fp32", "n_rows": "i32", "H": "i32",
                     "stride_dy_row": "i32", "stride_x_row": "i32", "stride_dx_row": "i32"}
            report[f"rmsnorm_bwd/H{H}/{dt}"] = compile_sm90(rmsnorm._rmsnorm_bwd_kernel, types, common,
                                                            cfg["num_warps"], 1)
    return report


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Triton's real compiler lowers both kernels for sm_90a without register spills, within an H100's shared
    memory (the interpreter never compiles them)."""
    hopper_compile.assert_fits_without_spills(hopper_compile.report("test_rmsnorm", "_hopper_report"))

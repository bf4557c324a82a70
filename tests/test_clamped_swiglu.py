"""kernels/clamped_swiglu.py (gpt-oss's activation) in Triton's interpreter vs the torch reference; the reference
backward vs autograd (and the reference forward vs transformers' own gate: tests/test_moe_transformers.py).

On a GPU machine `TRITON_INTERPRET=0 pytest tests/test_clamped_swiglu.py` runs the same checks on compiled kernels."""
import hopper_compile
import pytest
import torch
from kernel_checks import assert_within_reference_error, bf16_round_to_nearest, dry_run_autotune  # noqa: F401

from horizon_triton.kernels import clamped_swiglu
from horizon_triton.kernels.clamped_swiglu import clamped_swiglu_backward_ref, clamped_swiglu_forward_ref

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
ALPHA, LIMIT = 1.702, 7.0


def _gate_up(M, I, dtype, dev):
    """Values on both sides of both clamps (±limit), and exactly at them (torch's clamp passes the gradient there)."""
    gate_up = torch.randn(M, 2 * I, device=dev) * 6
    gate_up[0, :4] = torch.tensor([LIMIT, LIMIT, -LIMIT, -LIMIT])
    return gate_up.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, I", [(37, 130), (1, 100), (64, 72)])
def test_kernel_matches_reference(M, I, dtype, dev):
    gate_up = _gate_up(M, I, dtype, dev)
    dh = torch.randn(M, I, dtype=dtype, device=dev)
    for name, fn, fn_ref, args in (
            ("h", clamped_swiglu.clamped_swiglu_forward, clamped_swiglu_forward_ref, (gate_up,)),
            ("d_gate_up", clamped_swiglu.clamped_swiglu_backward, clamped_swiglu_backward_ref, (dh, gate_up))):
        out, ref = fn(*args, ALPHA, LIMIT), fn_ref(*args, ALPHA, LIMIT)
        ref32 = fn_ref(*(a.float() for a in args), ALPHA, LIMIT)
        assert_within_reference_error(out, ref, ref32, ATOL[dtype] * (1 + ref32.abs().max().item()), name)


def test_strided_rows(dev):
    buf = _gate_up(37, 150, torch.bfloat16, dev)
    gate_up = buf[:, 20:280]                                          # [37, 260], row stride 300
    dh = torch.randn(37, 200, dtype=torch.bfloat16, device=dev)[:, 50:180]
    torch.testing.assert_close(clamped_swiglu.clamped_swiglu_forward(gate_up, ALPHA, LIMIT),
                               clamped_swiglu_forward_ref(gate_up, ALPHA, LIMIT), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(clamped_swiglu.clamped_swiglu_backward(dh, gate_up, ALPHA, LIMIT),
                               clamped_swiglu_backward_ref(dh, gate_up, ALPHA, LIMIT), rtol=1e-2, atol=1e-2)


def test_reference_backward_matches_autograd(dev):
    """Against autograd through gpt-oss's own formula (clamps included: values exactly at ±limit)."""
    gate_up = _gate_up(37, 130, torch.float32, dev).requires_grad_(True)
    dh = torch.randn(37, 130, device=dev)
    gate, up = gate_up[:, ::2].clamp(max=LIMIT), gate_up[:, 1::2].clamp(-LIMIT, LIMIT)
    ((up + 1) * gate * torch.sigmoid(gate * ALPHA)).backward(dh)
    torch.testing.assert_close(clamped_swiglu_backward_ref(dh, gate_up.detach(), ALPHA, LIMIT), gate_up.grad,
                               rtol=1e-5, atol=1e-5)


def test_clear_errors(dev):
    f = clamped_swiglu.clamped_swiglu_forward
    with pytest.raises(ValueError, match="even"):
        f(torch.randn(4, 7, device=dev), ALPHA, LIMIT)
    with pytest.raises(TypeError, match="dtype"):
        f(torch.randn(4, 8, device=dev).double(), ALPHA, LIMIT)
    with pytest.raises(ValueError, match="contiguous"):
        f(torch.randn(8, 4, device=dev).t(), ALPHA, LIMIT)
    with pytest.raises(ValueError, match="dh shape"):
        clamped_swiglu.clamped_swiglu_backward(torch.randn(4, 3, device=dev), torch.randn(4, 8, device=dev),
                                               ALPHA, LIMIT)


def test_autotune_dry_run(monkeypatch, tmp_path, dev):
    cands = [{"ROWS": 4, "BLOCK_I": 64, "num_warps": 1}, {"ROWS": 2, "BLOCK_I": 32, "num_warps": 1}]
    rows, stored = dry_run_autotune(monkeypatch, tmp_path, clamped_swiglu, "CANDIDATES", cands, dict(M=5, I=100),
                                    dev)
    assert [r["shape"]["kernel"] for r in rows] == ["clamped_swiglu_fwd", "clamped_swiglu_bwd"]
    assert all(r["config"] == cands[-1] and r["throughput"].endswith("GB/s") for r in rows)
    assert stored["clamped_swiglu_fwd"]["I100_bfloat16"] == stored["clamped_swiglu_bwd"]["I100_bfloat16"] == cands[-1]


def _hopper_report() -> dict:
    """Both kernels compiled for sm_90 at the default config, bf16 and fp32 (child process of
    test_kernels_compile_for_hopper)."""
    from hopper_compile import compile_sm90
    report = {}
    for dt in ("bf16", "fp32"):
        shapes = {"M": "i32", "I": "i32", "alpha": "fp32", "limit": "fp32"}
        types = {"gate_up_ptr": f"*{dt}", "h_ptr": f"*{dt}", "stride_gu_row": "i32", "stride_h_row": "i32", **shapes}
        report[f"fwd/{dt}"] = compile_sm90(clamped_swiglu._clamped_swiglu_fwd_kernel, types,
                                           dict(ROWS=4, BLOCK_I=512), 8, 1)
        types = {"dh_ptr": f"*{dt}", "gate_up_ptr": f"*{dt}", "d_gate_up_ptr": f"*{dt}", "stride_dh_row": "i32",
                 "stride_gu_row": "i32", "stride_dgu_row": "i32", **shapes}
        report[f"bwd/{dt}"] = compile_sm90(clamped_swiglu._clamped_swiglu_bwd_kernel, types,
                                           dict(ROWS=4, BLOCK_I=512), 8, 1)
    return report


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Triton's real compiler lowers both kernels for sm_90a without register spills."""
    hopper_compile.assert_fits_without_spills(hopper_compile.report("test_clamped_swiglu", "_hopper_report"))

"""kernels/swiglu.py in Triton's interpreter vs the torch reference; the reference backward vs autograd.

On a GPU machine `TRITON_INTERPRET=0 pytest tests/test_swiglu.py` runs the same checks on compiled kernels."""
import hopper_compile
import pytest
import torch
from kernel_checks import assert_within_reference_error, bf16_round_to_nearest, dry_run_autotune  # noqa: F401

from horizon_triton.kernels import swiglu
from horizon_triton.kernels.swiglu import swiglu_backward_ref, swiglu_forward_ref

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, I", [(37, 130), (1, 100), (64, 256)])
def test_kernel_matches_reference(T, I, dtype, dev):
    gate_up = torch.randn(T, 2 * I, dtype=dtype, device=dev) * 3
    dh = torch.randn(T, I, dtype=dtype, device=dev)
    for name, fn, fn_ref, args in (("h", swiglu.swiglu_forward, swiglu_forward_ref, (gate_up,)),
                                   ("d_gate_up", swiglu.swiglu_backward, swiglu_backward_ref, (dh, gate_up))):
        out, ref = fn(*args), fn_ref(*args)
        ref32 = fn_ref(*(a.float() for a in args))
        assert_within_reference_error(out, ref, ref32, ATOL[dtype] * (1 + ref32.abs().max().item()), name)


def test_strided_rows(dev):
    """gate_up may be a column slice of a wider buffer; dh may be a strided view."""
    buf = torch.randn(37, 300, dtype=torch.bfloat16, device=dev)
    gate_up = buf[:, 20:280]                                          # [37, 260], row stride 300
    dh = torch.randn(37, 200, dtype=torch.bfloat16, device=dev)[:, 50:180]   # [37, 130], row stride 200
    torch.testing.assert_close(swiglu.swiglu_forward(gate_up), swiglu_forward_ref(gate_up), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(swiglu.swiglu_backward(dh, gate_up), swiglu_backward_ref(dh, gate_up),
                               rtol=1e-2, atol=1e-2)


def test_reference_backward_matches_autograd(dev):
    gate_up = (torch.randn(37, 260, device=dev) * 3).requires_grad_(True)
    dh = torch.randn(37, 130, device=dev)
    swiglu_forward_ref(gate_up).backward(dh)
    torch.testing.assert_close(swiglu_backward_ref(dh, gate_up.detach()), gate_up.grad, rtol=1e-5, atol=1e-5)


def test_clear_errors(dev):
    with pytest.raises(ValueError, match="even"):
        swiglu.swiglu_forward(torch.randn(4, 7, device=dev))
    with pytest.raises(ValueError, match=r"\[T, 2I\]"):
        swiglu.swiglu_forward(torch.randn(2, 4, 8, device=dev))
    with pytest.raises(TypeError, match="dtype"):
        swiglu.swiglu_forward(torch.randn(4, 8, device=dev).to(torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        swiglu.swiglu_forward(torch.randn(8, 4, device=dev).t())
    with pytest.raises(ValueError, match="dh shape"):
        swiglu.swiglu_backward(torch.randn(4, 3, device=dev), torch.randn(4, 8, device=dev))


def test_autotune_dry_run(monkeypatch, tmp_path, dev):
    cands = [{"ROWS": 1, "BLOCK_I": 64, "num_warps": 1}, {"ROWS": 2, "BLOCK_I": 32, "num_warps": 1}]
    rows, stored = dry_run_autotune(monkeypatch, tmp_path, swiglu, "CANDIDATES", cands, dict(T=5, I=100), dev)
    assert [r["shape"]["kernel"] for r in rows] == ["swiglu_fwd", "swiglu_bwd"]
    assert all(r["config"] == cands[-1] and r["throughput"].endswith("GB/s") for r in rows)
    assert stored["swiglu_fwd"]["I100_bfloat16"] == stored["swiglu_bwd"]["I100_bfloat16"] == cands[-1]


def _hopper_report() -> dict:
    """Both kernels compiled for sm_90 (tests/hopper_compile.py) at the default config (4 rows of 1024 columns per
    program, 8 warps) in bf16 and fp32; child process of test_kernels_compile_for_hopper."""
    from hopper_compile import compile_sm90
    report = {}
    for dt in ("bf16", "fp32"):
        types = {"gate_up_ptr": f"*{dt}", "h_ptr": f"*{dt}", "T": "i32", "I": "i32", "stride_gu_row": "i32",
                 "stride_h_row": "i32"}
        report[f"swiglu_fwd/{dt}"] = compile_sm90(swiglu._swiglu_fwd_kernel, types, dict(ROWS=4, BLOCK_I=1024), 8, 1)
        types = {"dh_ptr": f"*{dt}", "gate_up_ptr": f"*{dt}", "d_gate_up_ptr": f"*{dt}", "T": "i32", "I": "i32",
                 "stride_dh_row": "i32", "stride_gu_row": "i32", "stride_dgu_row": "i32"}
        report[f"swiglu_bwd/{dt}"] = compile_sm90(swiglu._swiglu_bwd_kernel, types, dict(ROWS=4, BLOCK_I=1024), 8, 1)
    return report


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Triton's real compiler lowers both kernels for sm_90a without register spills, within an H100's shared
    memory (the interpreter never compiles them)."""
    hopper_compile.assert_fits_without_spills(hopper_compile.report("test_swiglu", "_hopper_report"))

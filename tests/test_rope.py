"""kernels/rope.py in Triton's interpreter vs the torch reference; the reference vs transformers and autograd.

On a GPU machine `TRITON_INTERPRET=0 pytest tests/test_rope.py` runs the same checks on compiled kernels."""
import hopper_compile
import pytest
import torch
from kernel_checks import assert_within_reference_error, bf16_round_to_nearest, dry_run_autotune  # noqa: F401

from horizon_triton.kernels import rope
from horizon_triton.kernels.rope import rope_backward_ref_, rope_forward_ref_

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def _cos_sin(T, D, dev, base=10000.0, offset=0):
    """transformers' construction: inv_freq over half the head dim, duplicated: cat(freqs, freqs)."""
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32, device=dev) / D)
    freqs = (torch.arange(T, dtype=torch.float32, device=dev) + offset)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, nH, D", [(37, 5, 72), (3, 2, 128), (16, 3, 6)])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_kernel_matches_reference(T, nH, D, dtype, direction, dev):
    cos, sin = _cos_sin(T, D, dev, offset=100)
    x = torch.randn(T, nH, D, dtype=dtype, device=dev)
    fn, fn_ref = ((rope.rope_forward_, rope_forward_ref_) if direction == "forward"
                  else (rope.rope_backward_, rope_backward_ref_))
    out = x.clone()
    assert fn(out, cos, sin) is out                                   # in place, returns its argument
    ref, ref32 = fn_ref(x.clone(), cos, sin), fn_ref(x.float(), cos, sin)
    assert_within_reference_error(out, ref, ref32, ATOL[dtype] * (1 + ref32.abs().max().item()), direction)


def test_general_cos_sin_halves(dev):
    """Halves of cos/sin that differ are still applied as the reference applies them."""
    x = torch.randn(7, 3, 10, device=dev)
    cos, sin = torch.randn(7, 10, device=dev), torch.randn(7, 10, device=dev)
    torch.testing.assert_close(rope.rope_forward_(x.clone(), cos, sin), rope_forward_ref_(x.clone(), cos, sin))


def test_in_place_on_a_view_of_fused_qkv(dev):
    qkv = torch.randn(37, 4 + 2 + 2, 72, dtype=torch.bfloat16, device=dev)  # [T, q heads | k heads | v heads, D]
    before = qkv.clone()
    cos, sin = _cos_sin(37, 72, dev)
    rope.rope_forward_(qkv[:, 4:6], cos, sin)                         # rotate k only, in place
    torch.testing.assert_close(qkv[:, 4:6], rope_forward_ref_(before[:, 4:6].clone(), cos, sin), rtol=0, atol=0)
    assert torch.equal(qkv[:, :4], before[:, :4]) and torch.equal(qkv[:, 6:], before[:, 6:])
    rope.rope_backward_(qkv[:, 4:6], cos, sin)                        # the inverse rotation undoes it
    torch.testing.assert_close(qkv.float(), before.float(), rtol=0, atol=0.05)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reference_matches_transformers(family, dev):
    import importlib

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    T, nH, nKV, D = 37, 4, 2, 72
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=nH * D, num_attention_heads=nH,
                                              num_key_value_heads=nKV, head_dim=D)).to(dev)
    q, k = torch.randn(T, nH, D, device=dev), torch.randn(T, nKV, D, device=dev)
    positions = torch.arange(T, device=dev)[None] + 5
    cos, sin = rotary(q, positions)                                   # [1, T, D] fp32
    q_hf, k_hf = module.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(cos[0], _cos_sin(T, D, dev, offset=5)[0], rtol=1e-5, atol=1e-5)
    for x, x_hf in ((q, q_hf), (k, k_hf)):
        expect = x_hf[0].transpose(0, 1)                              # back to [T, nH, D]
        torch.testing.assert_close(rope_forward_ref_(x.clone(), cos[0], sin[0]), expect, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rope.rope_forward_(x.clone(), cos[0], sin[0]), expect, rtol=1e-5, atol=1e-5)


def test_reference_backward_matches_autograd(dev):
    cos, sin = _cos_sin(37, 72, dev)
    x0 = torch.randn(37, 5, 72, requires_grad=True, device=dev)
    dy = torch.randn(37, 5, 72, device=dev)
    rope_forward_ref_(x0.clone(), cos, sin).backward(dy)
    torch.testing.assert_close(rope_backward_ref_(dy.clone(), cos, sin), x0.grad, rtol=1e-5, atol=1e-5)


def test_clear_errors(dev):
    cos, sin = _cos_sin(4, 8, dev)
    with pytest.raises(ValueError, match=r"\[T, nH, D\]"):
        rope.rope_forward_(torch.randn(4, 8, device=dev), cos, sin)
    with pytest.raises(ValueError, match="even"):
        rope.rope_forward_(torch.randn(4, 2, 7, device=dev), cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match=r"cos must be \[T, D\]"):
        rope.rope_forward_(torch.randn(5, 2, 8, device=dev), cos, sin)
    with pytest.raises(TypeError, match="sin must be float32"):
        rope.rope_backward_(torch.randn(4, 2, 8, device=dev), cos, sin.bfloat16())
    with pytest.raises(ValueError, match="last axis"):
        rope.rope_forward_(torch.randn(4, 8, 2, device=dev).transpose(1, 2), cos, sin)


def test_autotune_dry_run(monkeypatch, tmp_path, dev):
    cands = [{"HEADS": 1, "num_warps": 1}, {"HEADS": 4, "num_warps": 1}]
    rows, stored = dry_run_autotune(monkeypatch, tmp_path, rope, "candidates", cands, dict(T=5, nH=3, D=72), dev)
    (row,) = rows
    assert row["config"] == cands[-1] and row["throughput"].endswith("GB/s")
    assert stored["rope"]["nH3_D72_bfloat16"] == cands[-1]


def _hopper_report() -> dict:
    """The kernel compiled for sm_90 (tests/hopper_compile.py), inverse rotation, 16 heads of a 128 head dim per
    program, bf16 and fp32; child process of test_kernels_compile_for_hopper."""
    from hopper_compile import compile_sm90
    report = {}
    for dt in ("bf16", "fp32"):
        types = {"x_ptr": f"*{dt}", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "n_heads": "i32", "HALF": "i32",
                 "stride_x_t": "i32", "stride_x_h": "i32", "stride_cs_t": "i32"}
        report[f"rope/inverse/{dt}"] = compile_sm90(rope._rope_kernel, types,
                                                    dict(INVERSE=True, HEADS=16, BLOCK_HALF=64), 4, 1)
    return report


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Triton's real compiler lowers the kernel for sm_90a without register spills, within an H100's shared
    memory (the interpreter never compiles it)."""
    hopper_compile.assert_fits_without_spills(hopper_compile.report("test_rope", "_hopper_report"))

"""kernels/moe_experts.py in Triton's interpreter vs the torch reference, op by op and as a whole MoE block
(tests/moe_block.py: routing, permutation, grouped GEMMs, activation, combine, and all of their backward).

On a GPU machine `TRITON_INTERPRET=0 pytest tests/test_moe_experts.py` runs the same checks on compiled kernels."""
import hopper_compile
import moe_block
import pytest
import torch
from kernel_checks import assert_within_reference_error, bf16_round_to_nearest, dry_run_autotune  # noqa: F401

from horizon_triton.kernels import moe_experts, reference
from horizon_triton.kernels.moe_experts import (moe_combine_backward_ref, moe_combine_forward_ref,
                                                moe_down_backward_ref, moe_down_forward_ref, moe_gate_up_backward_ref,
                                                moe_gate_up_forward_ref)
from horizon_triton.models.ops import load_ops

ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}
H, I = 40, 36                      # neither a multiple of the interpreter's 32-wide tiles
CASES = [  # T, E, k: odd token counts, top-k 1/2/4/8, E 8..128, experts with no token (T·k < E, or top-1)
    (37, 8, 2), (37, 16, 1), (19, 8, 8), (5, 128, 4)]


def _routing(T, E, k, dev):
    """Distinct experts per token; expert 1 crowded (token t < 34 picks it first): at T = 37 it spans two of the
    interpreter's 32-row tiles."""
    ids = torch.stack([torch.randperm(E, device=dev)[:k] for _ in range(T)]).to(torch.int32)
    for t in range(min(T, 34)):
        ids[t] = torch.cat((ids[t][ids[t] == 1], ids[t][ids[t] != 1]))  # expert 1 first, if chosen
        if ids[t, 0] != 1:
            ids[t, 0] = 1
    return (ids, *reference.moe_permute(ids, E))


def _check(name, fn, fn_ref, args, dtype, grads=()):
    """The kernel, the low-precision reference and the fp32 reference on fp32 copies, each with its own copies
    of the gradient buffers ``grads`` (non-zero: accumulation is checked too); every output compared."""
    lift = lambda a: a.float() if torch.is_tensor(a) and a.is_floating_point() else a  # noqa: E731
    runs = []
    for f, cast in ((fn, lambda a: a), (fn_ref, lambda a: a), (fn_ref, lift)):
        bufs = [g.clone() for g in grads]
        out = f(*(cast(a) for a in args), *bufs)
        runs.append([*(out if isinstance(out, tuple) else (out,)), *bufs])
    for i, (o, r, r32) in enumerate(zip(*runs)):
        assert_within_reference_error(o, r, r32, ATOL[dtype] * (1 + r32.abs().max().item()), f"{name}[{i}]")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, E, k", CASES)
def test_grouped_gemms_match_reference(T, E, k, dtype, dev):
    _, order, offsets = _routing(T, E, k, dev)
    rand = lambda *shape, s=1.0: (s * torch.randn(*shape, device=dev)).to(dtype)  # noqa: E731
    x, h = rand(T, H), rand(T * k, I)
    w_gu, b_gu, w_d, b_d = rand(E, 2 * I, H, s=H ** -0.5), rand(E, 2 * I), rand(E, H, I, s=I ** -0.5), rand(E, H)
    d_gate_up, d_o = rand(T * k, 2 * I), rand(T * k, H)
    grad = lambda *shape: torch.randn(*shape, device=dev)  # noqa: E731
    _check("gate_up_fwd", moe_experts.moe_gate_up_forward, moe_gate_up_forward_ref,
           (x, order, offsets, k, w_gu, b_gu), dtype)
    _check("down_fwd", moe_experts.moe_down_forward, moe_down_forward_ref, (h, order, offsets, w_d, b_d), dtype)
    _check("gate_up_bwd", moe_experts.moe_gate_up_backward, moe_gate_up_backward_ref,
           (d_gate_up, x, order, offsets, k, w_gu), dtype, grads=(grad(E, 2 * I, H), grad(E, 2 * I)))
    _check("down_bwd", moe_experts.moe_down_backward, moe_down_backward_ref, (d_o, h, order, offsets, w_d), dtype,
           grads=(grad(E, H, I), grad(E, H)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_biases_and_with_transposed_weights(dtype, dev):
    """No biases (Mixtral, Qwen3, DeepSeek), and gpt-oss's [E, K, N] parameters passed as transposed views."""
    T, E, k = 37, 8, 2
    _, order, offsets = _routing(T, E, k, dev)
    x = torch.randn(T, H, device=dev).to(dtype)
    w_gu = torch.randn(E, H, 2 * I, device=dev).to(dtype).transpose(1, 2)        # [E, 2I, H] view
    w_d = torch.randn(E, I, H, device=dev).to(dtype).transpose(1, 2)             # [E, H, I] view
    _check("gate_up_fwd", moe_experts.moe_gate_up_forward, moe_gate_up_forward_ref, (x, order, offsets, k, w_gu),
           dtype)
    h, d_o = torch.randn(T * k, I, device=dev).to(dtype), torch.randn(T * k, H, device=dev).to(dtype)
    _check("down_bwd", moe_experts.moe_down_backward, moe_down_backward_ref, (d_o, h, order, offsets, w_d), dtype,
           grads=(torch.zeros(E, I, H, device=dev).transpose(1, 2),))
    d_gate_up = torch.randn(T * k, 2 * I, device=dev).to(dtype)
    _check("gate_up_bwd", moe_experts.moe_gate_up_backward, moe_gate_up_backward_ref,
           (d_gate_up, x, order, offsets, k, w_gu), dtype,
           grads=(torch.zeros(E, H, 2 * I, device=dev).transpose(1, 2),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, k", [(37, 1), (19, 4), (5, 8)])
def test_combine_matches_reference(T, k, dtype, dev):
    o = torch.randn(T * k, H, device=dev).to(dtype)
    weights = torch.rand(T, k, device=dev)
    dy = torch.randn(T, H, device=dev).to(dtype)
    _check("combine_fwd", moe_experts.moe_combine_forward, moe_combine_forward_ref, (o, weights), dtype)
    _check("combine_bwd", moe_experts.moe_combine_backward, moe_combine_backward_ref, (dy, o, weights), dtype)


def test_reference_backward_matches_autograd(dev):
    """Each expert op's hand-written backward against autograd on its forward (fp32, with biases)."""
    T, E, k = 37, 8, 2
    _, order, offsets = _routing(T, E, k, dev)
    x, h = torch.randn(T, H, device=dev, requires_grad=True), torch.randn(T * k, I, device=dev, requires_grad=True)
    params = [torch.randn(*s, device=dev, requires_grad=True) for s in ((E, 2 * I, H), (E, 2 * I), (E, H, I), (E, H))]
    w_gu, b_gu, w_d, b_d = params
    weights = torch.rand(T, k, device=dev, requires_grad=True)
    gate_up = moe_gate_up_forward_ref(x, order, offsets, k, w_gu, b_gu)
    o = moe_down_forward_ref(h, order, offsets, w_d, b_d)
    y = moe_combine_forward_ref(o, weights)
    d_gate_up, dy = torch.randn_like(gate_up), torch.randn_like(y)
    torch.autograd.backward((gate_up, y), (d_gate_up, dy))
    with torch.no_grad():
        d_o, d_weights = moe_combine_backward_ref(dy, o, weights)
        grads = [torch.zeros_like(p) for p in params]
        dh = moe_down_backward_ref(d_o, h, order, offsets, w_d, grads[2], grads[3])
        dx = moe_gate_up_backward_ref(d_gate_up, x, order, offsets, k, w_gu, grads[0], grads[1])
    for name, ours, auto in (("dx", dx, x.grad), ("dh", dh, h.grad), ("d_weights", d_weights, weights.grad),
                             *zip(("dw_gu", "db_gu", "dw_d", "db_d"), grads, (p.grad for p in params))):
        torch.testing.assert_close(ours, auto, rtol=1e-4, atol=1e-5, msg=name)


BLOCKS = {
    "qwen3": moe_block.MoeSpec(8, 2, renormalize=False),
    "gpt_oss": moe_block.MoeSpec(16, 4, activation="clamped"),
    "deepseek": moe_block.MoeSpec(16, 4, routing="sigmoid", n_group=4, topk_group=2, scaling=2.5,
                                  router_fp32=True),
    "top1_128": moe_block.MoeSpec(128, 1),
}


WHOLE_BLOCK_CASES = [*((n, torch.float32) for n in BLOCKS), ("gpt_oss", torch.bfloat16), ("deepseek", torch.bfloat16)]


@pytest.mark.parametrize("name, dtype", WHOLE_BLOCK_CASES,
                         ids=[f"{n}-{str(d).removeprefix('torch.')}" for n, d in WHOLE_BLOCK_CASES])
def test_whole_block_matches_reference(name, dtype, dev):
    """Every MoE op of the Triton backend composed into a block, forward and backward, against the reference
    ops in the same composition: the output, dX and every parameter's gradient."""
    spec, T = BLOCKS[name], 19
    E = spec.num_experts
    rand = lambda *shape, s=1.0: (s * torch.randn(*shape, device=dev)).to(dtype)  # noqa: E731
    params = dict(router_w=rand(E, H, s=0.5), w_gu=rand(E, 2 * I, H, s=H ** -0.5), w_d=rand(E, H, I, s=I ** -0.5))
    if spec.activation == "clamped":
        params.update(router_b=rand(E), b_gu=rand(E, 2 * I), b_d=rand(E, H))
        params["w_gu"] = params["w_gu"] * 8                       # reach the clamps
    if spec.routing == "sigmoid":
        params["score_bias"] = 0.1 * torch.randn(E, device=dev)
    x, dy = rand(T, H), rand(T, H)
    triton_ops = load_ops("triton-interpret")
    lift = lambda d: {n: (p.float() if n != "score_bias" else p) for n, p in d.items()}  # noqa: E731
    results = []
    for ops, xx, dd, pp in ((triton_ops, x, dy, params), (reference, x, dy, params),
                            (reference, x.float(), dy.float(), lift(params))):
        y, saved = moe_block.forward(ops, spec, xx, pp)
        grads = moe_block.new_grads(pp)
        dx = moe_block.backward(ops, spec, dd, saved, pp, grads)
        results.append({"ids": saved["ids"], "y": y, "dx": dx, **grads})
    out, ref, ref32 = results
    assert torch.equal(out["ids"], ref["ids"])
    for key in ("y", "dx", *moe_block.new_grads(params)):
        assert_within_reference_error(out[key], ref[key], ref32[key],
                                      ATOL[dtype] * (1 + ref32[key].abs().max().item()), key)


@pytest.mark.parametrize("fn", [moe_experts.moe_gate_up_backward, moe_gate_up_backward_ref])
def test_frozen_experts_get_their_input_gradient_alone(fn, dev):
    """d_weight None (frozen experts, LoRA): the same dx, no weight-gradient GEMM; the down projection's too."""
    T, E, k = 37, 8, 2
    _, order, offsets = _routing(T, E, k, dev)
    x, w = torch.randn(T, H, device=dev), torch.randn(E, 2 * I, H, device=dev)
    d_gate_up = torch.randn(T * k, 2 * I, device=dev)
    torch.testing.assert_close(fn(d_gate_up, x, order, offsets, k, w, None),
                               fn(d_gate_up, x, order, offsets, k, w, torch.zeros(E, 2 * I, H, device=dev)))
    down = moe_experts.moe_down_backward if fn is moe_experts.moe_gate_up_backward else moe_down_backward_ref
    h, w_d, d_o = torch.randn(T * k, I, device=dev), torch.randn(E, H, I, device=dev), torch.randn(T * k, H, device=dev)
    torch.testing.assert_close(down(d_o, h, order, offsets, w_d, None),
                               down(d_o, h, order, offsets, w_d, torch.zeros(E, H, I, device=dev)))


def test_clear_errors(dev):
    T, E, k = 5, 4, 2
    _, order, offsets = _routing(T, E, k, dev)
    x, w = torch.randn(T, H, device=dev), torch.randn(E, 2 * I, H, device=dev)
    f = moe_experts.moe_gate_up_forward
    with pytest.raises(ValueError, match=r"\[E=4, N, 40\]"):
        f(x, order, offsets, k, w[:, :, :8])
    with pytest.raises(TypeError, match="cast the weight"):
        f(x, order, offsets, k, w.bfloat16())
    with pytest.raises(TypeError, match="moe_permute"):
        f(x, order.long(), offsets, k, w)
    with pytest.raises(ValueError, match="T·k = 15"):
        f(x, order, offsets, 3, w)
    with pytest.raises(ValueError, match="bias shape"):
        f(x, order, offsets, k, w, torch.zeros(E, 3, device=dev))
    with pytest.raises(ValueError, match="d_weight must be fp32"):
        moe_experts.moe_gate_up_backward(torch.randn(T * k, 2 * I, device=dev), x, order, offsets, k, w,
                                         torch.zeros(E, 2 * I, H, device=dev, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="d_bias without d_weight"):
        moe_experts.moe_gate_up_backward(torch.randn(T * k, 2 * I, device=dev), x, order, offsets, k, w, None,
                                         torch.zeros(E, 2 * I, device=dev))
    with pytest.raises(ValueError, match="weights must be fp32"):
        moe_experts.moe_combine_forward(torch.randn(T * k, H, device=dev), torch.rand(T, k + 1, device=dev))


def test_autotune_dry_run(monkeypatch, tmp_path, dev):
    gemm = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)] * 2
    dw = [dict(BLOCK_N=32, BLOCK_K=32, BLOCK_R=16, num_warps=4, num_stages=1)] * 2
    monkeypatch.setattr(moe_experts, "DW_CANDIDATES", dw)
    rows, stored = dry_run_autotune(monkeypatch, tmp_path, moe_experts, "GEMM_CANDIDATES", gemm,
                                    dict(T=13, H=40, I=24, E=8, k=2), dev)
    names = ["moe_gate_up_fwd", "moe_down_fwd", "moe_down_dh", "moe_gate_up_dx", "moe_gate_up_dw", "moe_down_dw"]
    assert [r["shape"]["kernel"] for r in rows] == names
    assert all("TFLOPS" in r["throughput"] for r in rows)
    assert stored["moe_gate_up_fwd"]["M32_N48_K40_E8_bfloat16"] == gemm[-1]
    assert stored["moe_down_dw"]["M32_N40_K24_E8_bfloat16"] == dw[-1]


def _hopper_report() -> dict:
    """The grouped GEMM and dW kernels compiled for sm_90 at their bf16 and fp32 defaults, with and without bias
    (child process of test_kernels_compile_for_hopper); the combine kernels at their defaults."""
    from hopper_compile import compile_sm90
    me = moe_experts
    report = {}
    idx = ("a_index_ptr", "c_index_ptr", "offsets_ptr", "d_index_ptr")
    for dt, gemm, dw_default, precision in (("bf16", me._HOPPER_GEMM, me._HOPPER_DW, "tf32"),
                                            ("fp32", me._FP32_GEMM, me._FP32_DW, "ieee")):
        for has_bias in (False, True):
            dw = me._HOPPER_DW_BIAS if has_bias and dt == "bf16" else dw_default
            fn = me._grouped_gemm_kernel
            meta = {k: gemm[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
            meta.update(HAS_BIAS=has_bias, BLOCK_E=256, UPCAST=False, PRECISION=precision)
            types = {n: ("*i32" if n in idx else f"*{dt}") if n.endswith("_ptr") else "i32"
                     for n in fn.arg_names if n not in meta}
            report[f"grouped_gemm/{dt}/bias={has_bias}"] = compile_sm90(fn, types, meta, gemm["num_warps"],
                                                                        gemm["num_stages"])
            fn = me._grouped_dw_kernel
            meta = {k: dw[k] for k in ("BLOCK_N", "BLOCK_K", "BLOCK_R")}
            meta.update(HAS_BIAS=has_bias, UPCAST=False, PRECISION=precision)
            types = {n: ("*i32" if n in idx else "*fp32" if n in ("dw_ptr", "db_ptr") else f"*{dt}")
                     if n.endswith("_ptr") else "i32" for n in fn.arg_names if n not in meta}
            report[f"grouped_dw/{dt}/bias={has_bias}"] = compile_sm90(fn, types, meta, dw["num_warps"],
                                                                      dw["num_stages"])
        cfg = me._ELEMENTWISE
        types = {"o_ptr": f"*{dt}", "w_ptr": "*fp32", "y_ptr": f"*{dt}", "T": "i32", "H": "i32",
                 "stride_o_s": "i32", "stride_y_t": "i32"}
        report[f"combine/{dt}"] = compile_sm90(me._combine_kernel, types, dict(TOP_K=8, ROWS=cfg["ROWS"],
                                               BLOCK_H=cfg["BLOCK_H"]), cfg["num_warps"], 1)
        types = {"dy_ptr": f"*{dt}", "o_ptr": f"*{dt}", "w_ptr": "*fp32", "d_o_ptr": f"*{dt}", "d_w_ptr": "*fp32",
                 "T": "i32", "H": "i32", "stride_dy_t": "i32", "stride_o_s": "i32", "stride_do_s": "i32"}
        report[f"combine_bwd/{dt}"] = compile_sm90(me._combine_bwd_kernel, types, dict(
            TOP_K=8, BLOCK_K=8, ROWS=cfg["ROWS"], BLOCK_H=cfg["BLOCK_H"]), cfg["num_warps"], 1)
    return report


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """Triton's real compiler lowers the grouped GEMMs for sm_90a: the bf16 ones on wgmma with a cp.async
    pipeline, every kernel without register spills and within an H100's shared memory."""
    report = hopper_compile.report("test_moe_experts", "_hopper_report")
    hopper_compile.assert_fits_without_spills(report)
    for name, r in report.items():
        if name.startswith("grouped") and "/bf16/" in name:
            assert r["wgmma"] > 0, f"{name}: no wgmma in the compiled kernel"
            assert r["pipelined"], f"{name}: the K loop is not software-pipelined"

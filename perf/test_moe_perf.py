"""MoE experts: the grouped GEMMs of kernels/moe_experts.py against torch._grouped_mm (the library baseline, which
needs the rows gathered first), and a whole MoE layer forward + backward (routing, permutation, gate_up, SwiGLU,
down, combine and all their backward).

GPU (bf16, T = 8192 tokens, balanced routing: every expert gets T·k/E rows): gpt-oss-120b's experts (H 2880,
I 2880, E 128, k 4) and Qwen3-235B-A22B's (H 4096, I 1536, E 128, k 8). A grouped GEMM's TFLOPS = 2·T·k·N·K / time;
the layer's = 6·T·k·(2I·H + H·I) / time (forward 2, backward 4 FLOPs per multiply-add), routing not counted.
Without a GPU: the engine's CPU path (the references' per-expert loop) against torch._grouped_mm on CPU, fp32, on
a small shape; and the Triton kernels in the interpreter (a child process, TRITON_INTERPRET=1) on a tiny layer,
checked against the reference: correctness only, interpreter times say nothing about a GPU.

    pytest perf/test_moe_perf.py --benchmark-only
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from horizon_triton.kernels import reference, tuning

GPU_SHAPES = {"gpt_oss_120b": dict(T=8192, H=2880, I=2880, E=128, k=4),
              "qwen3_235b": dict(T=8192, H=4096, I=1536, E=128, k=8)}
CPU_SHAPES = {"gpt_oss_120b": dict(T=256, H=256, I=256, E=16, k=4), "qwen3_235b": dict(T=256, H=256, I=128, E=16, k=8)}
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _ops(device):
    """The Triton launchers on a GPU, the torch references (the engine's CPU path) otherwise."""
    if device.type == "cuda":
        from horizon_triton.models.ops import load_ops
        return load_ops("triton", "cuda"), "triton"
    return reference, "torch reference (CPU path)"


def _layer(device, T, H, I, E, k):
    """Inputs of one expert layer on balanced routing (expert of slot t·k + j: (t·k + j) mod E)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape, s=1.0: (s * torch.randn(*shape, device=device, generator=g)).to(dtype)  # noqa: E731
    ids = ((torch.arange(T, device=device)[:, None] * k + torch.arange(k, device=device)) % E).to(torch.int32)
    order, offsets = reference.moe_permute(ids, E)
    return dict(x=rand(T, H), order=order, offsets=offsets, k=k, w_gu=rand(E, 2 * I, H, s=H ** -0.5),
                w_d=rand(E, H, I, s=I ** -0.5), d_gate_up=rand(T * k, 2 * I), weights=torch.rand(T, k, device=device),
                router_logits=rand(T, E), dy=rand(T, H))


def _shape(device, model):
    return (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)[model]


@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_gate_up_forward(measure, record, device, model):
    """x[T, H] gathered by expert and multiplied by every expert's [2I, H]: one launch."""
    s = _shape(device, model)
    ops, path = _ops(device)
    m = _layer(device, **s)
    M, N = s["T"] * s["k"], 2 * s["I"]
    ms = measure(lambda: ops.moe_gate_up_forward(m["x"], m["order"], m["offsets"], s["k"], m["w_gu"]),
                 2 * M * N * s["H"], "2*T*k*N*K", path=path, dtype=str(m["x"].dtype), **s)
    if device.type == "cuda" and HAS_GROUPED_MM:
        library_ms = tuning.time_ms(lambda: _grouped_mm_gate_up(m))
        record(grouped_mm_ms=round(library_ms, 4), ratio_to_grouped_mm=round(ms / library_ms, 3))


def _grouped_mm_gate_up(m):
    rows = m["x"][m["order"].long() // m["k"]]                                # the gather it needs first
    return torch._grouped_mm(rows, m["w_gu"].transpose(-2, -1), offs=m["offsets"][1:])


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_gate_up_forward_grouped_mm(measure, device, model):
    """The baseline: the rows gathered, then torch._grouped_mm (CUTLASS on Hopper; a loop on CPU)."""
    s = _shape(device, model)
    m = _layer(device, **s)
    measure(lambda: _grouped_mm_gate_up(m), 2 * s["T"] * s["k"] * 2 * s["I"] * s["H"], "2*T*k*N*K",
            path="gather + torch._grouped_mm", dtype=str(m["x"].dtype), **s)


@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_gate_up_backward(measure, record, device, model):
    """dW_gu (fp32, accumulated) and dx (per slot, summed over k): 4·T·k·N·K FLOPs."""
    s = _shape(device, model)
    ops, path = _ops(device)
    m = _layer(device, **s)
    d_w = torch.zeros(m["w_gu"].shape, dtype=torch.float32, device=device)
    M, N = s["T"] * s["k"], 2 * s["I"]
    ms = measure(lambda: ops.moe_gate_up_backward(m["d_gate_up"], m["x"], m["order"], m["offsets"], s["k"],
                                                  m["w_gu"], d_w),
                 4 * M * N * s["H"], "4*T*k*N*K", path=path, dtype=str(m["x"].dtype), **s)
    if device.type == "cuda" and HAS_GROUPED_MM:
        library_ms = tuning.time_ms(lambda: _grouped_mm_gate_up_backward(m, d_w))
        record(grouped_mm_ms=round(library_ms, 4), ratio_to_grouped_mm=round(ms / library_ms, 3))


def _grouped_mm_gate_up_backward(m, d_w):
    """The same work on torch._grouped_mm: dW in the activation dtype, then added; dx per slot, then summed."""
    rows = m["x"][m["order"].long() // m["k"]]
    offs = m["offsets"][1:]
    d_w += torch._grouped_mm(m["d_gate_up"].t(), rows, offs=offs)
    dx_rows = torch._grouped_mm(m["d_gate_up"], m["w_gu"], offs=offs)
    dx = torch.empty_like(dx_rows)
    dx[m["order"].long()] = dx_rows
    return dx.view(-1, m["k"], dx.shape[1]).sum(1)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_gate_up_backward_grouped_mm(measure, device, model):
    s = _shape(device, model)
    m = _layer(device, **s)
    d_w = torch.zeros(m["w_gu"].shape, dtype=torch.float32, device=device)
    measure(lambda: _grouped_mm_gate_up_backward(m, d_w), 4 * s["T"] * s["k"] * 2 * s["I"] * s["H"],
            "4*T*k*N*K", path="gather + torch._grouped_mm", dtype=str(m["x"].dtype), **s)


def layer_step(ops, m, E):
    """One expert layer forward and backward (Qwen3's softmax routing, SwiGLU); returns dx."""
    k = m["k"]
    weights, ids = ops.moe_softmax_topk_forward(m["router_logits"], k, True)
    order, offsets = ops.moe_permute(ids, E)
    gate_up = ops.moe_gate_up_forward(m["x"], order, offsets, k, m["w_gu"])
    h = ops.swiglu_forward(gate_up)
    o = ops.moe_down_forward(h, order, offsets, m["w_d"])
    ops.moe_combine_forward(o, weights)
    d_o, d_weights = ops.moe_combine_backward(m["dy"], o, weights)
    dh = ops.moe_down_backward(d_o, h, order, offsets, m["w_d"], m["d_w_d"])
    d_gate_up = ops.swiglu_backward(dh, gate_up)
    dx = ops.moe_gate_up_backward(d_gate_up, m["x"], order, offsets, k, m["w_gu"], m["d_w_gu"])
    ops.moe_softmax_topk_backward(d_weights, m["router_logits"], ids, True)
    return dx


@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_moe_layer_forward_backward(measure, device, model):
    s = _shape(device, model)
    ops, path = _ops(device)
    m = _layer(device, **s)
    m.update(d_w_gu=torch.zeros(m["w_gu"].shape, device=device), d_w_d=torch.zeros(m["w_d"].shape, device=device))
    flops = 6 * s["T"] * s["k"] * 3 * s["I"] * s["H"]
    measure(lambda: layer_step(ops, m, s["E"]), flops, "6*T*k*3*I*H", path=path, dtype=str(m["x"].dtype),
            peak_memory=True, **s)


INTERPRETER_CHECK = """
import json, sys, time, torch
sys.path.insert(0, {perf!r})
from test_moe_perf import _layer, layer_step
from horizon_triton.kernels import reference
from horizon_triton.models.ops import load_ops
s = dict(T=37, H=40, I=36, E=8, k=2)
out = {{}}
for name, ops in (("interpreter", load_ops("triton-interpret")), ("reference", reference)):
    m = _layer(torch.device("cpu"), **s)
    m.update(d_w_gu=torch.zeros(m["w_gu"].shape), d_w_d=torch.zeros(m["w_d"].shape))
    t0 = time.perf_counter()
    out[name] = (layer_step(ops, m, s["E"]), m["d_w_gu"], m["d_w_d"], time.perf_counter() - t0)
err = max((a - b).abs().max().item() for a, b in zip(out["interpreter"][:3], out["reference"][:3]))
print(json.dumps(dict(max_abs_error=err, interpreter_s=out["interpreter"][3], reference_s=out["reference"][3])))
"""


def test_interpreter_layer_matches_reference(benchmark, record, device):
    """The Triton kernels of one layer (T 37, H 40, I 36, E 8, k 2, fp32) in the interpreter, against the reference:
    correctness of what the GPU will compile, measured where no GPU is."""
    if device.type == "cuda":
        pytest.skip("the compiled kernels are measured above")
    import json
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = INTERPRETER_CHECK.format(perf=str(Path(__file__).parent))

    def run():
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    result = benchmark.pedantic(run, rounds=1, iterations=1)
    record(**result, note="interpreter wall time: correctness only, not a speed figure")
    assert result["max_abs_error"] < 1e-4

"""A whole MoE block (router, routing, experts, combine), forward and hand-written backward, composed from one ops
namespace: kernels/reference.py's functions or the Triton launchers (tests/test_moe_*.py).

This is the composition the layer template will run (issue 21's wiring); the tests hold it against transformers'
own MoE modules (reference ops) and the Triton ops against the reference ops on it.

``MoeSpec`` says what a family does; the parameters come as a dict in our layout:
    router_w[E, H] (router_b[E]: gpt-oss), score_bias[E] (DeepSeek/GLM's e_score_correction_bias),
    w_gu[E, 2I, H] (a view: gpt-oss's [E, H, 2I] transposed), b_gu[E, 2I], w_d[E, H, I], b_d[E, H]
gradients as fp32 buffers of the same shapes (dW accumulated in place, as every op here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    routing: str = "softmax"              # "softmax" (Mixtral, Qwen3-MoE, gpt-oss) or "sigmoid" (DeepSeek-V3, GLM)
    renormalize: bool = True
    n_group: int = 1                       # sigmoid only
    topk_group: int = 1
    scaling: float = 1.0
    router_fp32: bool = False              # DeepSeek/GLM compute the router's logits in fp32
    activation: str = "swiglu"             # "swiglu" ([gate | up]) or "clamped" (gpt-oss, interleaved)
    alpha: float = 1.702
    limit: float = 7.0


def route(ops, spec: MoeSpec, logits, params):
    if spec.routing == "softmax":
        return ops.moe_softmax_topk_forward(logits, spec.top_k, spec.renormalize)
    return ops.moe_sigmoid_topk_forward(logits, params["score_bias"], spec.top_k, spec.n_group, spec.topk_group,
                                        spec.renormalize, spec.scaling)


def route_backward(ops, spec: MoeSpec, d_weights, logits, ids):
    if spec.routing == "softmax":
        return ops.moe_softmax_topk_backward(d_weights, logits, ids, spec.renormalize)
    return ops.moe_sigmoid_topk_backward(d_weights, logits, ids, spec.renormalize, spec.scaling)


def forward(ops, spec: MoeSpec, x, params):
    """x[T, H] -> (y[T, H], saved for backward)."""
    xr = x.float() if spec.router_fp32 else x
    logits = xr @ params["router_w"].to(xr.dtype).t()                             # [T, E]
    if params.get("router_b") is not None:
        logits = logits + params["router_b"].to(logits.dtype)
    weights, ids = route(ops, spec, logits, params)                               # [T, k] fp32, int32
    order, offsets = ops.moe_permute(ids, spec.num_experts)
    gate_up = ops.moe_gate_up_forward(x, order, offsets, spec.top_k, params["w_gu"], params.get("b_gu"))
    h = (ops.swiglu_forward(gate_up) if spec.activation == "swiglu"
         else ops.clamped_swiglu_forward(gate_up, spec.alpha, spec.limit))       # [T·k, I] expert order
    o = ops.moe_down_forward(h, order, offsets, params["w_d"], params.get("b_d"))  # [T·k, H] slot order
    y = ops.moe_combine_forward(o, weights)
    return y, dict(x=x, logits=logits, weights=weights, ids=ids, order=order, offsets=offsets, gate_up=gate_up,
                   h=h, o=o)


def new_grads(params) -> dict:
    return {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            for name, p in params.items() if p is not None and name != "score_bias"}


def backward(ops, spec: MoeSpec, dy, s, params, grads) -> torch.Tensor:
    """dy[T, H] -> dx[T, H]; accumulates every parameter's gradient into ``grads`` (fp32, in place)."""
    d_o, d_weights = ops.moe_combine_backward(dy, s["o"], s["weights"])
    dh = ops.moe_down_backward(d_o, s["h"], s["order"], s["offsets"], params["w_d"], grads["w_d"], grads.get("b_d"))
    d_gate_up = (ops.swiglu_backward(dh, s["gate_up"]) if spec.activation == "swiglu"
                 else ops.clamped_swiglu_backward(dh, s["gate_up"], spec.alpha, spec.limit))
    dx = ops.moe_gate_up_backward(d_gate_up, s["x"], s["order"], s["offsets"], spec.top_k, params["w_gu"],
                                  grads["w_gu"], grads.get("b_gu"))
    d_logits = route_backward(ops, spec, d_weights, s["logits"], s["ids"])       # [T, E]
    x = s["x"]
    xr = x.float() if spec.router_fp32 else x
    grads["router_w"] += d_logits.float().t() @ xr.float()
    if "router_b" in grads:
        grads["router_b"] += d_logits.float().sum(0)
    return (dx.float() + d_logits.float() @ params["router_w"].float()).to(x.dtype)

"""The MoE references (kernels/reference.py), composed into a block by tests/moe_block.py, against transformers' own
MoE modules in fp32: the output, and the hand-written backward against autograd through transformers' block
(dX, the router's weight (and bias), every expert weight and bias).

Families: qwen3_moe (softmax top-k, renormalized or not), mixtral (renormalized), gpt_oss (router bias, softmax
over the top-k logits, clamped SwiGLU on interleaved gate/up, expert biases, transposed weights), deepseek_v3 and
glm4_moe (sigmoid scores, correction bias, grouped top-k, routed scaling). Odd token counts; with 16 experts and
37 tokens at top-1 some experts get no token."""
import importlib

import moe_block
import pytest
import torch

from horizon_triton.kernels import reference

T_TOKENS, HIDDEN, INTER = 37, 24, 20


def _module(family: str, E: int, k: int, **extra):
    """(transformers module(s), MoeSpec, params in our layout) with random weights."""
    configs = importlib.import_module(f"transformers.models.{family}")
    models = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    g = torch.Generator().manual_seed(1)

    def fill(t, std):
        with torch.no_grad():
            t.copy_(std * torch.randn(t.shape, generator=g))

    if family == "qwen3_moe":
        cfg = configs.Qwen3MoeConfig(hidden_size=HIDDEN, moe_intermediate_size=INTER, num_experts=E,
                                     num_experts_per_tok=k, hidden_act="silu", **extra)
        block = models.Qwen3MoeSparseMoeBlock(cfg)
        spec = moe_block.MoeSpec(E, k, renormalize=cfg.norm_topk_prob)
    elif family == "mixtral":
        cfg = configs.MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=E,
                                    num_experts_per_tok=k)
        block = models.MixtralSparseMoeBlock(cfg)
        spec = moe_block.MoeSpec(E, k)
    elif family == "gpt_oss":
        cfg = configs.GptOssConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=E,
                                   num_experts_per_tok=k)
        block = models.GptOssMLP(cfg)
        spec = moe_block.MoeSpec(E, k, activation="clamped", alpha=block.experts.alpha, limit=block.experts.limit)
    else:                                                  # deepseek_v3, glm4_moe: the router and the experts
        name = {"deepseek_v3": "DeepseekV3", "glm4_moe": "Glm4Moe"}[family]
        cfg = getattr(configs, f"{name}Config")(hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=E,
                                                num_experts_per_tok=k, **extra)
        block = torch.nn.ModuleDict({"gate": getattr(models, f"{name}TopkRouter")(cfg),
                                     "experts": getattr(models, f"{name}Experts")(cfg)})
        spec = moe_block.MoeSpec(E, k, routing="sigmoid", renormalize=cfg.norm_topk_prob, n_group=cfg.n_group,
                                 topk_group=cfg.topk_group, scaling=cfg.routed_scaling_factor, router_fp32=True)
    router = block.router if family == "gpt_oss" else block.gate
    experts = block.experts
    fill(router.weight, 0.5)
    for p in experts.parameters():
        fill(p, 0.3)
    if family == "gpt_oss":
        fill(router.bias, 0.5)
        with torch.no_grad():                              # gate values past the clamp limit, on both sides
            experts.gate_up_proj.mul_(8)
    if spec.routing == "sigmoid":
        fill(router.e_score_correction_bias, 0.1)
    transposed = family == "gpt_oss"                       # gpt-oss stores [E, K, N]: pass [E, N, K] views
    view = (lambda t: t.transpose(1, 2)) if transposed else (lambda t: t)
    params = dict(router_w=router.weight.detach(), router_b=getattr(router, "bias", None),
                  score_bias=getattr(router, "e_score_correction_bias", None),
                  w_gu=view(experts.gate_up_proj.detach()), b_gu=getattr(experts, "gate_up_proj_bias", None),
                  w_d=view(experts.down_proj.detach()), b_d=getattr(experts, "down_proj_bias", None))
    params = {n: (p.detach() if p is not None else None) for n, p in params.items()}
    return block, router, experts, spec, params, view


def _transformers_forward(family, block, x):
    if family == "gpt_oss":
        return block(x[None])[0][0]
    if family in ("deepseek_v3", "glm4_moe"):
        _, w, ids = block["gate"](x)
        return block["experts"](x, ids, w)
    return block(x[None])[0]


CASES = [
    ("qwen3_moe", 8, 2, dict(norm_topk_prob=True)),
    ("qwen3_moe", 16, 4, dict(norm_topk_prob=False)),
    ("qwen3_moe", 16, 1, dict(norm_topk_prob=False)),       # 37 tokens on 16 experts: some get none
    ("mixtral", 8, 2, {}),
    ("gpt_oss", 8, 4, {}),
    ("deepseek_v3", 16, 4, dict(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    ("deepseek_v3", 32, 8, dict(n_group=8, topk_group=4, norm_topk_prob=False, routed_scaling_factor=1.5)),
    ("glm4_moe", 16, 4, dict(n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)),
]


@pytest.mark.parametrize("family, E, k, extra", CASES, ids=[f"{c[0]}-E{c[1]}-k{c[2]}" for c in CASES])
def test_reference_block_matches_transformers(family, E, k, extra):
    pytest.importorskip(f"transformers.models.{family}")
    block, router, experts, spec, params, view = _module(family, E, k, **extra)
    x = torch.randn(T_TOKENS, HIDDEN, requires_grad=True)
    dy = torch.randn(T_TOKENS, HIDDEN)
    y_hf = _transformers_forward(family, block, x)
    y_hf.backward(dy)

    y, saved = moe_block.forward(reference, spec, x.detach(), params)
    torch.testing.assert_close(y, y_hf.detach(), rtol=1e-5, atol=1e-5)
    grads = moe_block.new_grads(params)
    dx = moe_block.backward(reference, spec, dy, saved, params, grads)
    torch.testing.assert_close(dx, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["router_w"], router.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["w_gu"], view(experts.gate_up_proj.grad), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["w_d"], view(experts.down_proj.grad), rtol=1e-4, atol=1e-5)
    if family == "gpt_oss":
        torch.testing.assert_close(grads["router_b"], router.bias.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads["b_gu"], experts.gate_up_proj_bias.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grads["b_d"], experts.down_proj_bias.grad, rtol=1e-4, atol=1e-5)
        gate, up = saved["gate_up"][:, 0::2], saved["gate_up"][:, 1::2]
        assert (gate > spec.limit).any() and (up.abs() > spec.limit).any(), "both clamps of gpt-oss must be hit"
    if k == 1:
        counts = saved["offsets"][1:] - saved["offsets"][:-1]
        assert (counts == 0).any(), "the test must include experts without tokens"


def test_sigmoid_routing_keeps_groups_apart():
    """The grouped choice is not a plain top-k: with topk_group=1 every chosen expert lies in one group, even
    where another group holds a better single score."""
    logits = torch.tensor([[5.0, -5.0, -5.0, -5.0, 4.0, 3.9, 3.8, -5.0]])     # groups of 2: {0,1} {2,3} {4,5} {6,7}
    _, ids = reference.moe_sigmoid_topk_forward(logits, torch.zeros(8), 2, 4, 1, True, 1.0)
    assert sorted(ids[0].tolist()) == [4, 5]            # group {4, 5}: 4.0 + 3.9 beats {0, 1}: 5.0 − 5.0

"""The generic template's MoE experts on the engine's ops (models/generic/experts.py): against transformers' own
grouped_mm experts under autograd, one call (output, dx, the routing weights' and every expert weight's gradient,
accumulated in place or returned, frozen), and whole training runs of every MoE family against transformers + torch
AdamW with the kernel path counted; the Triton kernels themselves in the interpreter; what falls back, and why."""
import logging
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import horizon_triton as ht
from horizon_triton.models.generic.config import GenericConfig
from horizon_triton.models.generic.experts import Experts, experts_forward, experts_gradients, experts_on
from horizon_triton.kernels import library
from horizon_triton.models.ops import KERNEL_FAMILY, load_ops
from generic_models import COMMON, FAMILIES, make_generic_model, mixed_batches
from hf_reference import reference_train
from test_generic_attention import count_calls

OPT = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)
MOE_FAMILIES = ["deepseek_v3", "glm4_moe", "gpt_oss", "mixtral", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next"]


def _ops(backend: str) -> SimpleNamespace:
    """load_ops(backend), or for "library" the torch backend with the library path's grouped GEMMs (what CUDA's
    torch backend runs) on CPU."""
    if backend != "library":
        return load_ops(backend)
    grouped = {n: getattr(library, n) for n, f in KERNEL_FAMILY.items() if f == "moe_experts" and hasattr(library, n)}
    return SimpleNamespace(**{**vars(load_ops("torch")), **grouped})


def _experts_module(model_type: str):
    """The first experts module of the family's tiny model (fp32, random weights and biases)."""
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    module = next(m for name, m in model.named_modules() if name.endswith("mlp.experts"))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def _routing(T: int, E: int, k: int):
    """Distinct experts a token; every third token picks expert 0 first (crowded), others may get none."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for t in range(T):
        row = torch.randperm(E, generator=g)[:k]
        if t % 3 == 0:
            row = torch.cat((torch.tensor([0]), row[row != 0]))[:k]
        rows.append(row)
    return torch.stack(rows), torch.rand(T, k, generator=g)


@pytest.mark.parametrize("backend", ["torch", "library", "triton-interpret"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("gradients", ["accumulated", "returned", "frozen"])
def test_one_call_matches_transformers_grouped_mm(model_type, backend, gradients):
    """qwen3_moe (SwiGLU on [gate | up]), gpt_oss (clamped SwiGLU on interleaved gate/up, biases, transposed
    weights): the output and every gradient equal transformers' grouped_mm experts under autograd. Accumulated:
    added into fp32 buffers (holding a previous micro-batch's), autograd given none; returned: to autograd in the
    weights' dtype; frozen: the input's gradients alone."""
    module = _experts_module(model_type)
    params = dict(module.named_parameters())
    T, E, k = 23, module.num_experts, 2
    ids, weights = _routing(T, E, k)
    x = torch.randn(T, module.gate_up_proj.shape[1 if module.is_transposed else 2])
    dy = torch.randn(T, x.shape[1])

    def run(fn, trained: bool):
        for p in params.values():
            p.requires_grad_(trained)
        xi, wi = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        y = fn(module, xi, ids, wi)
        inputs = [xi, wi, *params.values()] if trained else [xi, wi]
        return y, torch.autograd.grad(y, inputs, dy, allow_unused=True)

    y_ref, grads_ref = run(ALL_EXPERTS_FUNCTIONS["grouped_mm"], gradients != "frozen")
    before = {n: torch.randn(p.shape) for n, p in params.items()}
    accumulators = {id(p): before[n].clone() for n, p in params.items()} if gradients == "accumulated" else {}
    with experts_on(Experts(_ops(backend), "grouped_mm")), experts_gradients(accumulators):
        y, grads = run(experts_forward, gradients != "frozen")
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(["x", "routing weights"], grads, grads_ref):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
    if gradients == "frozen":
        assert len(grads) == 2
        return
    for (name, p), got, want in zip(params.items(), grads[2:], grads_ref[2:]):
        if gradients == "returned":
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
        else:
            assert got is None, name
            torch.testing.assert_close(accumulators[id(p)], before[name] + want, atol=1e-5, rtol=1e-5, msg=name)


def _count_calls(monkeypatch, engine) -> dict:
    return count_calls(monkeypatch, engine, ("moe_gate_up_forward", "moe_gate_up_backward", "moe_down_backward"))


@pytest.mark.parametrize("model_type", MOE_FAMILIES)
def test_training_on_the_kernel_path_matches_transformers(tmp_path, monkeypatch, caplog, model_type):
    """Every MoE family's experts run on the engine's ops (counted; none falls back), and 3 steps of packed and
    padded batches equal transformers + torch AdamW (its grouped_mm experts, under autograd)."""
    make_generic_model(model_type, tmp_path / "src")
    batches = mixed_batches(3)
    engine = ht.Engine(GenericConfig.from_pretrained(tmp_path / "src"),
                       ht.TrainConfig(**OPT, compute_dtype="float32", device="cpu"))
    calls = _count_calls(monkeypatch, engine)
    with caplog.at_level(logging.INFO, logger="horizon_triton"):
        history = engine.fit(batches)
    assert not [r for r in caplog.records if "experts instead" in r.getMessage()]
    assert calls["moe_gate_up_forward"] > 0
    assert calls["moe_gate_up_backward"] == calls["moe_down_backward"] > 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    for got, want in zip(history, reference_train(reference, batches, **OPT, split_documents=True)):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


def test_interpreted_triton_kernels_train_gpt_oss(tmp_path, monkeypatch):
    """HORIZON_KERNELS=interpret: the MoE Triton kernels (grouped GEMMs with biases on transposed weights, the
    clamped SwiGLU, permutation, combine) train gpt-oss as the torch backend does."""
    make_generic_model("gpt_oss", tmp_path / "src", head_dim=32)     # the attention kernels' smallest head dim
    batches = mixed_batches(2)
    engines = {}
    for backend in ("torch", "interpret"):
        monkeypatch.setenv("HORIZON_KERNELS", backend)
        engines[backend] = ht.Engine(GenericConfig.from_pretrained(tmp_path / "src"),
                                     ht.TrainConfig(**OPT, compute_dtype="float32", device="cpu"))
    calls = _count_calls(monkeypatch, engines["interpret"])
    got, want = (engines[b].fit(batches) for b in ("interpret", "torch"))
    assert calls["moe_gate_up_backward"] > 0 and engines["interpret"].kernel_backend == "triton-interpret"
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_a_gate_the_kernels_do_not_compute_falls_back_and_says_why(tmp_path, caplog):
    """Experts with GELU instead of SiLU: transformers' grouped_mm runs them (said once), and training still equals
    transformers."""
    make_generic_model("qwen3_moe", tmp_path / "src", hidden_act="gelu")
    batches = mixed_batches(2)
    engine = ht.Engine(GenericConfig.from_pretrained(tmp_path / "src"),
                       ht.TrainConfig(**OPT, compute_dtype="float32", device="cpu"))
    with caplog.at_level(logging.INFO, logger="horizon_triton"):
        history = engine.fit(batches)
    said = [r.getMessage() for r in caplog.records if "experts instead" in r.getMessage()]
    assert len(said) == 1 and "a gate function other than SwiGLU" in said[0] and "grouped_mm" in said[0], said
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    for got, want in zip(history, reference_train(reference, batches, **OPT, split_documents=True)):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("model_type", MOE_FAMILIES + ["llama4_text", "gemma2", "llama"])
def test_the_engine_knows_which_models_run_the_moe_kernels(model_type):
    """has_moe_experts decides whether the CUDA start-up check (canary) compiles and checks the MoE kernels: the
    families whose experts the kernels run, not Llama 4 (experts of its own code) nor dense models."""
    from horizon_triton.models.family import has_moe_experts
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES.get(model_type, {})})
    assert has_moe_experts(GenericConfig.from_hf(config)) == (model_type in MOE_FAMILIES)


@pytest.mark.parametrize("backend", ["torch", "library", "triton-interpret"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_lora_on_experts_matches_the_merged_weights(model_type, backend):
    """LoRA on both experts weights, the base frozen: the output and the gradients of x, the routing weights and
    every adapter equal transformers' grouped_mm on W + s · B_e A_e (peft's merge, lora.expert_delta) under
    autograd; the adapters' gradients accumulated in place."""
    from torch.func import functional_call

    from horizon_triton.models.generic.experts import experts_lora
    from horizon_triton.objectives.lora import expert_delta
    module = _experts_module(model_type)
    params = {n: p.detach().requires_grad_(False) for n, p in module.named_parameters()}
    T, E, k, r, s = 23, module.num_experts, 2, 3, 0.7
    ids, weights = _routing(T, E, k)
    x = torch.randn(T, module.gate_up_proj.shape[1 if module.is_transposed else 2])
    dy = torch.randn(T, x.shape[1])
    g = torch.Generator().manual_seed(5)
    adapters = {}
    for name in ("gate_up_proj", "down_proj"):
        _, d1, d2 = params[name].shape
        n_in, n_out = (d1, d2) if module.is_transposed else (d2, d1)
        adapters[name] = (torch.randn(r * E, n_in, generator=g) * 0.3, torch.randn(n_out, r * E, generator=g) * 0.3)
    leaves = [t.clone().requires_grad_(True) for pair in adapters.values() for t in pair]

    def inputs():
        return x.clone().requires_grad_(True), weights.clone().requires_grad_(True)

    xi, wi = inputs()
    merged = {**params, **{name: params[name] + s * expert_delta(a, b, E, module.is_transposed)
                           for name, (a, b) in zip(adapters, (leaves[:2], leaves[2:]))}}
    y_ref = functional_call(module, merged, (xi, ids, wi))
    want = torch.autograd.grad(y_ref, [xi, wi, *leaves], dy)

    xo, wo = inputs()
    ours = [t.detach().clone().requires_grad_(True) for t in leaves]
    accumulators = {id(t): torch.zeros(t.shape) for t in ours}
    with experts_on(Experts(_ops(backend), "grouped_mm")), experts_gradients(accumulators), \
            experts_lora({id(module): {"gate_up_proj": tuple(ours[:2]), "down_proj": tuple(ours[2:])}}, s):
        y = experts_forward(module, xo, ids, wo)
        got = torch.autograd.grad(y, [xo, wo, *ours], dy, allow_unused=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["x", "routing weights"], got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    for t, grad, ref in zip(ours, got[2:], want[2:]):
        assert grad is None
        torch.testing.assert_close(accumulators[id(t)], ref, atol=1e-5, rtol=1e-5)

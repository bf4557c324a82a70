"""LoRA on the generic layer template (transformers' own decoder layers) against peft + torch AdamW on the same
transformers model: losses, gradient norms and adapter weights in fp32 over packed and padded batches; peft loads
the saved adapter onto the transformers model and gives the same logits; targets that are not a decoder layer's
nn.Linear (a router, fused MoE experts, the head) are refused by name."""
import json

import pytest
import torch
import transformers

import horizon_triton as ht
from horizon_triton.models.generic.config import GenericConfig
from horizon_triton.models.generic.skeleton import skeleton
from generic_models import make_generic_model, mixed_batches
from hf_reference import reference_train

peft = pytest.importorskip("peft")

OPT = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)


def _load(src):
    return transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)


def _adapters(engine) -> dict[str, torch.Tensor]:
    """{name of the adapter as a parameter of a live PeftModel (adapter "default"): our fp32 master}."""
    s = engine.store
    return {p.hf_name.replace(".weight", ".default.weight"):
            s.master_values(i, p.offset, p.offset + p.numel, adapters=True).view(p.shape).clone()
            for i, layout in enumerate(s.adapter_layouts) for p in layout.params}


def _router_is_linear(cfg) -> bool:
    """Whether qwen3_moe's router (mlp.gate) is an nn.Linear in this transformers (in 5.x a router module holding
    its own weight)."""
    return isinstance(skeleton(cfg).layers[0].mlp.gate, torch.nn.Linear)


def _train_both(tmp_path, model_type, rank, alpha, targets, run, steps=3, parameters=()):
    """Our engine and peft + torch AdamW on the transformers model, from the same starting adapters (qwen3_moe:
    its router too where it is an nn.Linear); ``parameters``: peft's target_parameters (MoE experts' weights)."""
    src = tmp_path / "src"
    make_generic_model(model_type, src)
    batches = mixed_batches(steps)                      # plain, two packed documents a row, a padded row
    cfg = ht.ModelConfig.from_pretrained(src)
    assert isinstance(cfg, GenericConfig)
    if model_type == "qwen3_moe" and _router_is_linear(cfg):
        targets = (*targets, "gate")
    engine = ht.Engine(cfg, ht.TrainConfig(**{**OPT, "device": "cpu", **run}, compute_dtype="float32", lora_rank=rank,
                                           lora_alpha=alpha, lora_targets=targets, lora_target_parameters=parameters))
    extra = dict(target_parameters=list(parameters)) if parameters else {}
    model = peft.get_peft_model(_load(src), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                             lora_dropout=0.0, **extra))
    params = dict(model.named_parameters())
    ours = _adapters(engine)
    assert set(ours) == {n for n, p in params.items() if p.requires_grad}     # the same modules adapted
    with torch.no_grad():
        for name, value in ours.items():         # our A (B is zero in both)
            params[name].copy_(value)
    history = engine.fit(batches)
    # packed documents run one at a time: transformers' own packing support varies by model (gpt-oss mixes them)
    return engine, history, model, reference_train(model, batches, **OPT, split_documents=True), targets


EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


@pytest.mark.parametrize("model_type, rank, alpha, targets, run, parameters", [
    ("qwen3_moe", 4, 8, ("q_proj", "v_proj"), {}, ()),   # + its router, mlp.gate, if an nn.Linear (else refused)
    ("gemma2", 2, 4, ("o_proj", "down_proj"), {}, ()),   # soft-capped logits (the torch head), a scaled embedding
    # the frozen head in 3 vocabulary chunks (two passes), async streams, three slots, checkpoints offloaded
    ("gemma2", 4, 8, ("q_proj", "up_proj"), dict(device="cpu-async", num_slots=3, head_chunk_rows=40,
                                                 checkpoint_budget_bytes=0), ()),
    # MoE experts' fused weights (peft's target_parameters): both, nested as peft nests them; gpt-oss's stored
    # transposed, with biases, the down projection alone
    ("qwen3_moe", 2, 4, ("q_proj",), {}, EXPERTS),
    ("gpt_oss", 2, 4, ("q_proj",), {}, ("mlp.experts.down_proj",)),
])
def test_fp32_matches_peft_and_saved_adapter_loads_in_peft(tmp_path, model_type, rank, alpha, targets, run,
                                                           parameters):
    if parameters and not hasattr(peft.LoraConfig(), "target_parameters"):
        pytest.skip(f"peft {peft.__version__} has no target_parameters")
    engine, history, model, ref, targets = _train_both(tmp_path, model_type, rank, alpha, targets, run,
                                                       parameters=parameters)
    assert len(history) == len(ref) == 3
    for got, want in zip(history, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    params = dict(model.named_parameters())
    ours = _adapters(engine)
    for name, value in ours.items():
        torch.testing.assert_close(value, params[name].detach(), atol=1e-4, rtol=0, msg=name)
    assert all(ours[n].abs().max() > 0 for n in ours if "lora_B" in n)       # every B trained from its zero start
    assert all(params[n].detach().abs().max() > 0 for n in ours if "lora_B" in n)

    engine.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (rank, alpha, sorted(targets))
    assert config.get("target_parameters", []) == sorted(parameters)
    loaded = peft.PeftModel.from_pretrained(_load(tmp_path / "src"), tmp_path / "adapter")
    ids = mixed_batches(1, seed=7)[0]["input_ids"]
    logits = engine.logits(ids)
    with torch.no_grad():
        base = _load(tmp_path / "src")(ids).logits
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-4, rtol=0)
    assert (logits - base).abs().max() > 1e-3                                # the adapters changed the model

    engine.save_pretrained(tmp_path / "merged", merge=True)                  # W + s·B A: transformers alone
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path / "merged")(ids).logits, logits, atol=1e-4, rtol=0)


def test_targets_other_than_a_layers_linear_are_refused(tmp_path):
    src = tmp_path / "src"
    make_generic_model("qwen3_moe", src)
    cfg = ht.ModelConfig.from_pretrained(src)
    router = [] if _router_is_linear(cfg) else [
        (["q_proj", "gate"], r"'gate' names \['model.layers.0.mlp.gate \(\w+\)', 'model.layers.1.mlp.gate \(\w+\)'\], "
                             r"which is not an nn.Linear")]
    available = r"\['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj'"
    for targets, match in router + [
        (["down_proj"], r"'down_proj' names \['model.layers.0.mlp.experts.down_proj \(4, 32, 16\)'.*fused MoE "
                        r"experts stored as 3-D parameters"),
        (["experts"], r"'experts' names \['model.layers.0.mlp.experts \(\w+\)'.* not an nn.Linear"),
        (["lm_head"], r"'lm_head' names \['lm_head'\], outside the decoder layers"),
        (["qkv"], r"'qkv' matches no module of model type 'qwen3_moe'; give names among the decoder layers' "
                  r"linear projections " + available)]:
        with pytest.raises(ValueError, match=match):
            ht.Engine(cfg, ht.TrainConfig(device="cpu", lora_rank=4, lora_targets=targets))
    with pytest.raises(ValueError, match=r"'mlp.experts.up_proj' matches no MoE experts weight of model type "
                                         r"'qwen3_moe'; give names among \['mlp.experts.gate_up_proj', "
                                         r"'mlp.experts.down_proj'\]"):
        ht.Engine(cfg, ht.TrainConfig(device="cpu", lora_rank=4, lora_target_parameters=["mlp.experts.up_proj"]))
    with pytest.raises(ValueError, match="lora_target_parameters needs lora_rank"):
        ht.TrainConfig(lora_target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(ValueError, match="both empty"):
        ht.TrainConfig(lora_rank=4, lora_targets=[])
    dense = ht.preset("tiny")
    with pytest.raises(ValueError, match=r"hand-written dense family\) has no MoE experts"):
        ht.Engine(dense, ht.TrainConfig(device="cpu", lora_rank=4, lora_target_parameters=["mlp.experts.down_proj"]))


def test_experts_on_transformers_code_refuse_adapters(tmp_path):
    """Experts whose gate the kernels do not compute run transformers' code, which would ignore the adapters: the
    first step refuses, naming why."""
    make_generic_model("qwen3_moe", tmp_path / "src", hidden_act="gelu")
    engine = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"),
                       ht.TrainConfig(device="cpu", compute_dtype="float32", lora_rank=2,
                                      lora_target_parameters=["mlp.experts.down_proj"]))
    with pytest.raises(ValueError, match=r"Qwen3MoeExperts cannot carry LoRA adapters here: its experts run "
                                         r"transformers' code \(a gate function other than SwiGLU"):
        engine.fit(mixed_batches(1))


def test_cli_options_for_expert_adapters():
    """--lora-target-parameters reaches TrainConfig's lora_target_parameters; without --lora-rank it is refused."""
    from argparse import Namespace

    from horizon_triton.cli.train import lora_options
    args = Namespace(lora_rank=2, lora_alpha=None, lora_targets="q_proj",
                     lora_target_parameters="mlp.experts.gate_up_proj, mlp.experts.down_proj")
    assert ht.TrainConfig(**lora_options(args)).lora_target_parameters == ("mlp.experts.gate_up_proj",
                                                                           "mlp.experts.down_proj")
    with pytest.raises(ValueError, match="--lora-target-parameters and --merge need --lora-rank R"):
        lora_options(Namespace(lora_rank=None, lora_alpha=None, lora_targets=None,
                               lora_target_parameters="mlp.experts.down_proj"))

"""Micro-batches through a MoE layer together (TrainConfig.moe_merge_microbatches, experts.Meeting): each
micro-batch's layer call in a worker thread of its own, their experts run once over all their tokens. Training
equals the micro-batches one at a time and transformers + torch AdamW; the experts' grouped computation runs once
per layer and pass (counted); an exception in one micro-batch's layer reaches the caller and nothing hangs; LoRA
on the experts, the router auxiliary loss and layers run once per packed document train as one at a time; the
dry run counts the worker threads' work; the checkpoint budget leaves room for a group's recomputes."""
import threading

import pytest
import torch
import transformers
from safetensors.torch import load_file

import horizon_triton as ht
from horizon_triton.models.generic.config import GenericConfig
from horizon_triton.planning.dryrun import dry_run_shapes
from generic_models import COMMON, FAMILIES, make_generic_model, mixed_batches
from hf_reference import reference_train
from test_generic_attention import count_calls

OPT = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)
ACCUM = 3          # micro-batches a step: the first step's pack two documents a row and pad a row (mixed_batches)


def _engine(path, together: int, **extra) -> ht.Engine:
    return ht.Engine(GenericConfig.from_pretrained(path),
                     ht.TrainConfig(**OPT, grad_accum_steps=ACCUM, compute_dtype="float32", device="cpu",
                                    moe_merge_microbatches=together, **extra))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_merged_micro_batches_train_as_one_at_a_time_and_as_transformers(tmp_path, monkeypatch, model_type):
    """2 steps of 3 micro-batches: losses, gradient norms and weights equal (1e-6) with the 3 merged and one at a
    time, and equal transformers + torch AdamW; merged, the experts' permutation (one per grouped computation)
    runs once per MoE layer and pass: forward and the backward's recompute."""
    make_generic_model(model_type, tmp_path / "src")
    batches = mixed_batches(2 * ACCUM)
    histories, saved, permutes = {}, {}, {}
    for together in (1, ACCUM):
        engine = _engine(tmp_path / "src", together)
        calls = count_calls(monkeypatch, engine, ("moe_permute", "moe_gate_up_backward"))
        histories[together] = engine.fit(batches)
        permutes[together] = dict(calls)
        engine.save_pretrained(tmp_path / f"out{together}", dtype="float32")
        saved[together] = load_file(str(tmp_path / f"out{together}" / "model.safetensors"))
    layers, steps = 2, 2
    assert permutes[ACCUM]["moe_permute"] == 2 * layers * steps                  # forward + recompute, per layer
    assert permutes[1]["moe_permute"] == ACCUM * permutes[ACCUM]["moe_permute"]
    assert permutes[ACCUM]["moe_gate_up_backward"] == layers * steps            # one experts backward per layer
    for merged, alone in zip(histories[ACCUM], histories[1]):
        assert merged["loss"] == pytest.approx(alone["loss"], rel=1e-6)
        assert merged["grad_norm"] == pytest.approx(alone["grad_norm"], rel=1e-6)
    for name, value in saved[1].items():
        torch.testing.assert_close(saved[ACCUM][name], value, atol=1e-6, rtol=0, msg=name)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    want = reference_train(reference, batches, **OPT, grad_accum_steps=ACCUM, split_documents=True)
    for got, ref in zip(histories[ACCUM], want):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    for name, value in reference.state_dict().items():
        if name in saved[ACCUM]:
            torch.testing.assert_close(saved[ACCUM][name], value, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("model_type, extra", [
    ("qwen3_next", {}),      # its linear-attention layer runs each packed document apart: more experts calls
    ("qwen3_moe", dict(output_router_logits=True, router_aux_loss_coef=0.1)),     # the router auxiliary loss
])
def test_merged_micro_batches_match_one_at_a_time(tmp_path, monkeypatch, model_type, extra):
    """Qwen3-Next: a micro-batch packing two documents a row calls its linear-attention layer's experts once per
    document (4 calls), the others once: they meet while all call, then it goes on alone. Qwen3-MoE with the
    router auxiliary loss: each worker thread records its own router logits. Both train as one at a time (which
    test_generic_experts and test_generic_aux_loss check against transformers)."""
    make_generic_model(model_type, tmp_path / "src", **extra)
    batches = mixed_batches(2 * ACCUM)
    histories, permutes = {}, {}
    for together in (1, ACCUM):
        engine = _engine(tmp_path / "src", together)
        calls = count_calls(monkeypatch, engine, ("moe_permute",))
        histories[together] = engine.fit(batches)
        permutes[together] = calls["moe_permute"]
    # per pass of a step's 2 layers: one at a time 2·3 calls, merged 2; Qwen3-Next's first step, whose packed
    # micro-batch runs its 2 × 2 documents apart in the linear-attention layer: 3 more either way
    packed = 3 if model_type == "qwen3_next" else 0
    assert permutes[1] == 2 * (2 * 2 * ACCUM + packed) and permutes[ACCUM] == 2 * (2 * 2 + packed)
    for merged, alone in zip(histories[ACCUM], histories[1]):
        for key in ("loss", "grad_norm", "aux_loss"):
            if key in alone:
                assert merged[key] == pytest.approx(alone[key], rel=1e-6), key


def test_merged_lora_on_experts_matches_one_at_a_time(tmp_path, monkeypatch):
    """LoRA on both experts weights (peft's target_parameters) and on q/v, the base frozen: merged micro-batches
    train the adapters as one at a time (which test_generic_lora checks against peft)."""
    make_generic_model("qwen3_moe", tmp_path / "src")
    batches = mixed_batches(2 * ACCUM)
    lora = dict(lora_rank=2, lora_target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    histories, permutes = {}, {}
    for together in (1, ACCUM):
        engine = _engine(tmp_path / "src", together, **lora)
        calls = count_calls(monkeypatch, engine, ("moe_permute",))
        histories[together] = engine.fit(batches)
        permutes[together] = calls["moe_permute"]
    assert permutes[1] == ACCUM * permutes[ACCUM] > 0
    for merged, alone in zip(histories[ACCUM], histories[1]):
        assert merged["loss"] == pytest.approx(alone["loss"], rel=1e-6)
        assert merged["grad_norm"] == pytest.approx(alone["grad_norm"], rel=1e-6)


def _fit_in_thread(engine, batches) -> tuple[threading.Thread, list]:
    """engine.fit(batches) in a daemon thread (a hang fails the test instead of stopping it): (thread, outcome)."""
    outcome = []

    def fit():
        try:
            outcome.append(engine.fit(batches))
        except BaseException as error:        # noqa: B036 -- handed to the test
            outcome.append(error)
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    thread.join(timeout=120)
    return thread, outcome


@pytest.mark.parametrize("where", ["before the experts", "at the experts", "in the grouped experts"])
def test_an_exception_in_one_micro_batch_surfaces_and_nothing_hangs(tmp_path, monkeypatch, where):
    """One micro-batch of a merged group raises: in its attention (the others wait in their experts call or for
    their turn), at its experts call (the others wait there), or in the grouped computation itself. The caller
    gets that exception and no worker thread is left."""
    make_generic_model("qwen3_moe", tmp_path / "src")
    batches = mixed_batches(ACCUM)
    engine = _engine(tmp_path / "src", ACCUM)
    layer = engine.pipeline.template.layers[0]
    seen = [0]

    def fail_second(*args):
        seen[0] += 1
        if seen[0] == 2:
            raise RuntimeError("injected failure")
    if where == "before the experts":
        handle = layer.self_attn.register_forward_pre_hook(lambda module, args: fail_second())
    elif where == "at the experts":
        handle = layer.mlp.experts.register_forward_pre_hook(lambda module, args: fail_second())
    else:
        handle = None
        permute = engine.ops.moe_permute

        def failing(*args, **kwargs):
            fail_second()
            return permute(*args, **kwargs)
        monkeypatch.setattr(engine.ops, "moe_permute", failing)
    thread, outcome = _fit_in_thread(engine, batches)
    assert not thread.is_alive(), "the step hangs"
    assert isinstance(outcome[0], RuntimeError) and "injected failure" in str(outcome[0]), outcome
    assert not [t for t in threading.enumerate() if t.name.startswith("horizon-layer-")]
    if handle is not None:
        handle.remove()
    monkeypatch.undo()


def test_the_checkpoint_budget_holds_a_merged_group_of_recomputes(tmp_path):
    """default_checkpoint_budget with G micro-batches through a layer together leaves out the G largest of their
    layers' recompute + backward footprints (models.generic.footprint), not the largest alone."""
    from horizon_triton.schedule.activations import default_checkpoint_budget, layer_backward_bytes
    make_generic_model("qwen3_moe", tmp_path / "src")
    p = _engine(tmp_path / "src", ACCUM).pipeline
    shapes = [(2, 12), (1, 24), (2, 12), (1, 8)]
    free = 2**34
    each = sorted((layer_backward_bytes(p, *shape) for shape in shapes), reverse=True)
    alone = default_checkpoint_budget(p, free, shapes, 10)
    for together in (2, 3):
        assert alone - default_checkpoint_budget(p, free, shapes, 10, together) == sum(each[1:together]) > 0


def test_moe_merge_microbatches_is_validated():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="moe_merge_microbatches must be an int ≥ 1"):
            ht.TrainConfig(moe_merge_microbatches=bad)


def test_the_dry_run_counts_merged_layers():
    """The dry run (meta device) of a step of 3 micro-batches, merged and one at a time: the same GEMM and attention
    FLOPs (the worker threads' ops are counted: the caller's dispatch modes run in them) and nearly the same
    elementwise work (the merge's concatenations and autograd's sums of the weights' gradients over the group),
    fewer GEMM memory bytes (each expert's weights read once per layer and pass, not once per micro-batch), and
    a higher device peak (the 3 recomputes of a layer live at once)."""
    config = transformers.AutoConfig.for_model("qwen3_moe", **{**COMMON, **FAMILIES["qwen3_moe"]})
    cfg = GenericConfig.from_hf(config)
    runs = {together: dry_run_shapes(cfg, ht.TrainConfig(grad_accum_steps=ACCUM, moe_merge_microbatches=together),
                                     [(2, 32)] * ACCUM, kernel_backend="triton", device_memory_bytes=80 * 2**30,
                                     pin_memory=True)
            for together in (1, ACCUM)}
    merged, alone = runs[ACCUM], runs[1]
    assert merged.flops.keys() == alone.flops.keys() >= {"elementwise", "gemm_bfloat16", "attention_fwd"}
    for kind, flops in alone.flops.items():
        assert merged.flops[kind] == pytest.approx(flops, rel=0.05 if kind == "elementwise" else 1e-12), kind
    assert merged.device_memory_bytes["gemm_bfloat16"] < alone.device_memory_bytes["gemm_bfloat16"]
    assert merged.device_peak_bytes > alone.device_peak_bytes

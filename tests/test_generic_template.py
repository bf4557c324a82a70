"""The generic layer template (transformers' own decoder layers, models/generic) against transformers + torch
AdamW, and against the hand-written template on the families both train."""
import pytest
import torch
import transformers
from safetensors.torch import load_file

import horizon_triton as ht
from horizon_triton.models.generic.config import GenericConfig
from generic_models import FAMILIES, make_generic_model, mixed_batches
from hf_reference import make_hf_model, random_batches, reference_train

OPT = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)


def _fp32(**extra):
    return ht.TrainConfig(**OPT, compute_dtype="float32", device="cpu", **extra)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_fp32_matches_transformers_with_packing_and_padding(tmp_path, model_type):
    make_generic_model(model_type, tmp_path / "src")
    batches = mixed_batches(3)
    cfg = ht.ModelConfig.from_pretrained(tmp_path / "src")
    assert isinstance(cfg, GenericConfig)
    engine = ht.Engine(cfg, _fp32())
    history = engine.fit(batches)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    # packed documents run one at a time: transformers' own packing support varies by model and version
    want = reference_train(reference, batches, **OPT, split_documents=True)
    for got, ref in zip(history, want):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    engine.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, value in reference.state_dict().items():
        if name in saved:
            torch.testing.assert_close(saved[name], value, atol=1e-4, rtol=0, msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=1e-3, rtol=0)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_bf16_learns(tmp_path, model_type):
    """One batch six times in bf16 compute: the loss falls clearly (the bf16 path runs the family's layers)."""
    make_generic_model(model_type, tmp_path / "src")
    batch = mixed_batches(1)[0]
    engine = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"),
                       ht.TrainConfig(**{**OPT, "lr": 1e-2}, compute_dtype="bfloat16", device="cpu"))
    losses = [step["loss"] for step in engine.fit([batch] * 6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generic_and_hand_written_templates_agree(tmp_path, family):
    make_hf_model(family, tmp_path / "src")
    batches = random_batches(3, vocab=96)
    dense = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"), _fp32()).fit(batches)
    generic = ht.Engine(GenericConfig.from_pretrained(tmp_path / "src"), _fp32()).fit(batches)
    for a, b in zip(dense, generic):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)

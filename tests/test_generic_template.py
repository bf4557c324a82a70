"""The generic layer template (transformers' own decoder layers, models/generic) against transformers + torch
AdamW, and against the hand-written template on the families both train."""
import math

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
    return ht.TrainConfig(**{**OPT, "compute_dtype": "float32", "device": "cpu", **extra})


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
def test_bf16_learns_one_batch(tmp_path, model_type):
    """bf16 compute (its kernels, bf16 + int16 master halves): one packed and padded batch, 6 steps, the loss falls;
    the layers' buffers (Gemma 4's layer scalars) come out as they went in."""
    model = make_generic_model(model_type, tmp_path / "src")
    batch = mixed_batches(3)[2]
    batch["position_ids"] = mixed_batches(2)[1]["position_ids"]
    engine = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"),
                       ht.TrainConfig(**{**OPT, "lr": 1e-2}, compute_dtype="bfloat16", device="cpu"))
    losses = [step["loss"] for step in engine.fit([batch] * 6)]
    assert all(math.isfinite(x) for x in losses), losses
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    engine.save_pretrained(tmp_path / "out", dtype="float32")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, value in model.state_dict().items():
        if name not in params:
            torch.testing.assert_close(saved[name], value, atol=0, rtol=0, msg=name)


def test_gemma4_per_layer_inputs_and_kv_sharing_are_refused_by_name(tmp_path):
    make_generic_model("gemma4_text", tmp_path / "ple", hidden_size_per_layer_input=4)
    with pytest.raises(ValueError, match="embed_tokens_per_layer"):
        GenericConfig.from_pretrained(tmp_path / "ple")
    make_generic_model("gemma4_text", tmp_path / "shared", num_hidden_layers=3, num_kv_shared_layers=1,
                       layer_types=["sliding_attention", "full_attention", "full_attention"])
    with pytest.raises(ValueError, match="num_kv_shared_layers"):
        GenericConfig.from_pretrained(tmp_path / "shared")


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "qwen2"])
def test_generic_and_hand_written_templates_agree(tmp_path, family):
    """Mistral: a sliding window (8) shorter than the rows; Qwen2: q/k/v biases and a tied head. Batches 2 and 3
    pack two documents a row and pad a row."""
    make_hf_model(family, tmp_path / "src")
    batches = random_batches(1, vocab=96) + mixed_batches(3)[1:]
    dense = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"), _fp32()).fit(batches)
    generic = ht.Engine(GenericConfig.from_pretrained(tmp_path / "src"), _fp32()).fit(batches)
    for a, b in zip(dense, generic):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_async_device_and_vocabulary_chunks_change_nothing(tmp_path):
    """The race-testing device (random delays between the streams) and a head streamed in vocabulary chunks
    (two passes, torch head kept by the template) give the plain run's losses and gradient norms."""
    make_generic_model("qwen3_moe", tmp_path / "src")
    batches = mixed_batches(3)
    cfg = ht.ModelConfig.from_pretrained(tmp_path / "src")
    plain = ht.Engine(cfg, _fp32()).fit(batches)
    racing = ht.Engine(cfg, _fp32(device="cpu-async", num_slots=3)).fit(batches)
    chunked = ht.Engine(cfg, _fp32(head_chunk_rows=40)).fit(batches)
    for a, b, c in zip(plain, racing, chunked):
        assert (b["loss"], b["grad_norm"]) == (a["loss"], a["grad_norm"])
        assert c["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)

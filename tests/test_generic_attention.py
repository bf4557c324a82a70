"""The generic template's attention on the engine's kernels (models/generic/attention.py): where the kernels compute
what a layer asks for, they run, and training equals both transformers + torch AdamW and the template's own
fallback to transformers' attention; where they do not (sinks, soft-capped scores, masks of another shape), the
layer falls back, and says why once."""
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers import masking_utils

import horizon_triton as ht
from horizon_triton.models.generic import template as generic_template
from horizon_triton.models.generic.attention import NAME, documents
from horizon_triton.models.generic.config import GenericConfig
from generic_models import COMMON, make_generic_model, mixed_batches
from hf_reference import reference_train

OPT = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)

# model type -> what its tiny config sets beyond generic_models.COMMON: every one on the kernel path
KERNEL_FAMILIES = {
    "llama": {},
    "qwen3": {},
    "mistral": dict(sliding_window=5),                    # shorter than a row and than batch 1's 7-token document
    "gemma2": dict(sliding_window=6, attn_logit_softcapping=None, final_logit_softcapping=None),
}


def _engine(path, **train):
    return ht.Engine(GenericConfig.from_pretrained(path),
                     ht.TrainConfig(**OPT, compute_dtype="float32", device="cpu", **train))


def count_calls(monkeypatch, engine, names=("attention_forward", "attention_backward")) -> dict:
    """Counts the engine's calls of its ops ``names`` (by default the attention kernels, forward and backward)."""
    calls = dict.fromkeys(names, 0)
    for name in calls:
        op = getattr(engine.ops, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)
        monkeypatch.setattr(engine.ops, name, counted)
    return calls


def _fit_and_save(engine, batches, path):
    history = engine.fit(batches)
    engine.save_pretrained(path)
    return history, load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("model_type", sorted(KERNEL_FAMILIES))
def test_kernel_path_matches_fallback_and_transformers(tmp_path, monkeypatch, model_type):
    make_generic_model(model_type, tmp_path / "src", **KERNEL_FAMILIES[model_type])
    batches = mixed_batches(3)                            # plain, two packed documents a row, a padded row
    kernel_engine = _engine(tmp_path / "src")
    calls = count_calls(monkeypatch, kernel_engine)
    kernel, kernel_weights = _fit_and_save(kernel_engine, batches, tmp_path / "kernel")
    # each decoder layer of each micro-batch: forward, the backward's recompute, and one backward
    layers = COMMON["num_hidden_layers"]
    assert calls == {"attention_forward": 2 * 3 * layers, "attention_backward": 3 * layers}

    monkeypatch.setattr(generic_template, "attention_refusal", lambda ops, head_dim, dtype: "forced by the test")
    fallback_engine = _engine(tmp_path / "src")
    fallback_calls = count_calls(monkeypatch, fallback_engine)
    fallback, fallback_weights = _fit_and_save(fallback_engine, batches, tmp_path / "fallback")
    assert fallback_calls == {"attention_forward": 0, "attention_backward": 0}

    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    want = reference_train(reference, batches, **OPT)
    # the first step's gradients agree to ~1e-7; AdamW's first update (g / |g| for tiny g) lets fp32 rounding
    # differences grow to ~1e-5 in later steps' gradient norms, on either path against transformers
    assert kernel[0]["grad_norm"] == pytest.approx(fallback[0]["grad_norm"], rel=1e-6)
    for got, other, ref in zip(kernel, fallback, want):
        assert got["loss"] == pytest.approx(other["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(other["grad_norm"], rel=1e-4)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    for name, value in kernel_weights.items():        # three AdamW steps on each path's gradients
        torch.testing.assert_close(value, fallback_weights[name], atol=2e-4, rtol=0, msg=name)
    for name, value in reference.state_dict().items():
        if name in kernel_weights:
            torch.testing.assert_close(kernel_weights[name], value, atol=2e-4, rtol=0, msg=name)


@pytest.mark.parametrize("model_type, overrides, reason", [
    ("gemma2", dict(sliding_window=6), "soft-capped attention scores (softcap)"),
    ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6,
                     layer_types=["sliding_attention", "full_attention"]), "attention sinks (s_aux)"),
])
def test_unsupported_variants_fall_back_and_say_so_once(tmp_path, monkeypatch, caplog, model_type, overrides,
                                                        reason):
    """(gemma2's fallback training against transformers: test_generic_template.py.)"""
    make_generic_model(model_type, tmp_path / "src", **overrides)
    engine = _engine(tmp_path / "src")
    calls = count_calls(monkeypatch, engine)
    batches = mixed_batches(3)
    with caplog.at_level(logging.INFO, logger="horizon_triton"):
        history = engine.fit(batches)
    assert calls == {"attention_forward": 0, "attention_backward": 0}
    announced = [r.getMessage() for r in caplog.records if "instead of the kernels" in r.getMessage()]
    assert len(announced) == 1 and announced[0].endswith(reason), announced
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def _mask_config(**changes):
    config = transformers.LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, **changes)
    config._attn_implementation = NAME
    return config


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")     # renamed `cache` after transformers 5.17
def test_masks_the_kernels_compute_and_those_they_do_not():
    """The lazy mask knows which windows the kernels' masking reproduces it with, on the real query rows: a
    sliding window (with packed documents and a padded row), and not llama4's chunked attention."""
    generic_template.register()
    B, S = 2, 12
    embeds = torch.zeros(B, S, 8)
    padding = torch.ones(B, S, dtype=torch.bool)
    padding[1, 9:] = False
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 9 + [12 + 9, 12 + 10, 12 + 11]], dtype=torch.int32)
    args = dict(inputs_embeds=embeds, attention_mask=padding, past_key_values=None,
                position_ids=torch.arange(S).expand(B, S))
    with documents(doc_ids, eager=False):
        causal = masking_utils.create_causal_mask(config=_mask_config(), **args)
        window = masking_utils.create_sliding_window_causal_mask(config=_mask_config(sliding_window=3), **args)
        chunked = masking_utils.create_chunked_causal_mask(config=_mask_config(attention_chunk_size=4), **args)
    assert causal.window_refusal(None) is None
    assert causal.window_refusal(9) is None                  # no document longer than 9 tokens: the same mask
    assert "window in [9, inf]" in causal.window_refusal(8)
    assert window.window_refusal(3) is None
    assert window.window_refusal(None) is not None and window.window_refusal(4) is not None
    assert "not causal-plus-documents" in chunked.window_refusal(None)
    # the fallback's mask is transformers' mask AND-ed with the documents, built only when asked for
    want = masking_utils.sdpa_mask(batch_size=B, q_length=S, kv_length=S, attention_mask=padding, past_key_values=None,
                                   mask_function=masking_utils.sliding_window_causal_mask_function(3),
                                   allow_is_causal_skip=False)
    same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]
    assert torch.equal(window.tensor(), want & same_doc)


def test_interpreted_triton_kernels_one_step(tmp_path, monkeypatch):
    """HORIZON_KERNELS=interpret: the Triton attention kernels (and head) in Triton's interpreter, one step."""
    monkeypatch.setenv("HORIZON_KERNELS", "interpret")
    make_generic_model("llama", tmp_path / "src", head_dim=32)     # the kernels' smallest head dim
    batches = mixed_batches(2)[1:]                                  # two packed documents a row
    engine = _engine(tmp_path / "src")
    assert engine.kernel_backend == "triton-interpret"
    calls = count_calls(monkeypatch, engine)
    history = engine.fit(batches)
    assert calls["attention_forward"] == 4 and calls["attention_backward"] == 2
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    want = reference_train(reference, batches, **OPT)
    assert history[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5)
    assert history[0]["grad_norm"] == pytest.approx(want[0]["grad_norm"], rel=1e-4)

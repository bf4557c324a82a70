"""The engine against transformers + torch.optim.AdamW: same losses, gradient norms and weights."""
import pytest
import torch
import transformers
from safetensors.torch import load_file

import horizon_triton as ht
from hf_reference import FAMILIES, load_hf, make_hf_model, random_batches, reference_train

OPT = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)


def _train_both(tmp_path, family, steps=4, grad_accum_steps=1, compute_dtype="float32", device="cpu",
                batches=None, **extra):
    src = tmp_path / "src"
    make_hf_model(family, src)
    batches = batches or random_batches(steps * grad_accum_steps, vocab=96)
    engine = ht.Engine(ht.ModelConfig.from_pretrained(src),
                       ht.TrainConfig(**OPT, grad_accum_steps=grad_accum_steps, compute_dtype=compute_dtype,
                                      device=device, **extra))
    history = engine.fit(batches)
    reference = load_hf(src)
    ref_history = reference_train(reference, batches, grad_accum_steps=grad_accum_steps, **OPT)
    return engine, history, reference, ref_history


def _assert_weights_match(engine, reference, out_dir, atol=1e-4):
    engine.save_pretrained(out_dir)
    saved = load_file(str(out_dir / "model.safetensors"))
    expected = {k: v for k, v in reference.state_dict().items() if k in saved}
    assert set(saved) == set(expected)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[name], atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_matches_transformers(tmp_path, family):
    engine, history, reference, ref = _train_both(tmp_path, family)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for got, want in zip(history, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
        assert got["tokens"] == want["tokens"]
    _assert_weights_match(engine, reference, tmp_path / "out")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_grad_accumulation_matches_transformers(tmp_path, family):
    engine, history, reference, ref = _train_both(tmp_path, family, steps=3, grad_accum_steps=2)
    assert len(history) == 3
    for got, want in zip(history, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["tokens"] == want["tokens"]
    _assert_weights_match(engine, reference, tmp_path / "out")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bf16_close_to_fp32_reference_and_learns(tmp_path, family):
    batches = random_batches(1, vocab=96) * 6   # one batch seen again and again: its loss must fall
    engine, history, _, ref = _train_both(tmp_path, family, compute_dtype="bfloat16", batches=batches)
    for got, want in zip(history, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=0.02)
    assert history[-1]["loss"] < history[0]["loss"]


def test_cosine_schedule_matches_transformers(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama", src)
    batches = random_batches(6, vocab=96)
    engine = ht.Engine(ht.ModelConfig.from_pretrained(src),
                       ht.TrainConfig(**OPT, compute_dtype="float32", device="cpu", warmup_steps=2,
                                      lr_schedule="cosine"))
    history = engine.fit(batches)
    ref = reference_train(load_hf(src), batches, **OPT,
                          schedule=lambda opt: transformers.get_cosine_schedule_with_warmup(opt, 2, 6))
    assert [h["lr"] for h in history] == pytest.approx([r["lr"] for r in ref], abs=1e-12)
    for got, want in zip(history, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_cosine_without_known_length_is_an_error(tmp_path):
    engine = ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu", lr_schedule="cosine"))
    batches = iter(random_batches(2, vocab=64))
    with pytest.raises(ValueError, match="max_steps"):
        engine.fit(batches)


@pytest.mark.parametrize("family", ["llama_tied_bias", "qwen3"])
def test_saved_checkpoint_loads_in_transformers_with_same_logits(tmp_path, family):
    src = tmp_path / "src"
    original = make_hf_model(family, src)
    engine = ht.Engine(ht.ModelConfig.from_pretrained(src), ht.TrainConfig(device="cpu", compute_dtype="float32"))
    engine.save_pretrained(tmp_path / "out")
    reloaded = load_hf(tmp_path / "out")
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        want = original(ids).logits
        torch.testing.assert_close(reloaded(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(engine.logits(ids), want, atol=1e-4, rtol=1e-4)


def test_save_keeps_source_dtype_unless_overridden(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama", src, dtype=torch.bfloat16)
    engine = ht.Engine(ht.ModelConfig.from_pretrained(src), ht.TrainConfig(device="cpu"))
    engine.save_pretrained(tmp_path / "bf16")
    assert next(iter(load_file(str(tmp_path / "bf16" / "model.safetensors")).values())).dtype == torch.bfloat16
    engine.save_pretrained(tmp_path / "fp32", dtype="float32")
    assert next(iter(load_file(str(tmp_path / "fp32" / "model.safetensors")).values())).dtype == torch.float32


def test_packed_documents_equal_separate_sequences(tmp_path):
    """Restarting position_ids mark documents: the packed row's loss is the sum of the documents' losses."""
    src = tmp_path / "src"
    make_hf_model("llama", src)
    cfg = ht.ModelConfig.from_pretrained(src)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 96, (1, 7), generator=g), torch.randint(0, 96, (1, 9), generator=g)
    packed = torch.cat((a, b), dim=1)
    pos = torch.cat((torch.arange(7), torch.arange(9)))[None]
    labels = packed.clone()
    labels[0, 7] = -100   # the first token of document b is not predicted from document a
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", compute_dtype="float32", lr=0.0))
    packed_loss = engine.fit([{"input_ids": packed, "labels": labels, "position_ids": pos}])[0]["loss"]
    ref = load_hf(src)
    with torch.no_grad():
        losses = [ref(x, labels=x).loss * (x.shape[1] - 1) for x in (a, b)]
    assert packed_loss == pytest.approx(float(sum(losses)) / 14, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])   # untied, tied
def test_head_in_vocabulary_chunks_matches_transformers(tmp_path, family):
    """lm_head streamed 13 rows at a time (8 chunks of the 96-token vocabulary, the last one short) through the
    two-pass cross-entropy, two micro-batches a step: still transformers' losses, norms and weights."""
    engine, history, reference, ref = _train_both(tmp_path, family, steps=3, grad_accum_steps=2,
                                                  head_chunk_rows=13)
    assert [u.stop - u.start for u in engine.pipeline.head_chunks()] == [13] * 7 + [5]
    for got, want in zip(history, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    _assert_weights_match(engine, reference, tmp_path / "out")


@pytest.mark.parametrize("family", ["llama", "qwen2"])   # untied, tied
@pytest.mark.parametrize("head_chunk_rows", [None, 13])
def test_embedding_gradient_from_gathered_rows(tmp_path, family, head_chunk_rows):
    """Only the step's distinct token ids are gathered and get gradients on the device, yet the embedding's grad
    buffer is transformers' whole gradient (tied: lm_head's added), also in a second step whose ids are all
    different (the first step's rows must be zero again)."""
    src = tmp_path / "src"
    make_hf_model(family, src)
    batches = random_batches(2, vocab=40) + [{k: v + 50 for k, v in b.items()} for b in random_batches(2, vocab=40)]
    for b in batches[2:]:
        b["labels"][:, :3] = -100
    engine = ht.Engine(ht.ModelConfig.from_pretrained(src),
                       ht.TrainConfig(lr=0.0, compute_dtype="float32", device="cpu", grad_accum_steps=2,
                                      head_chunk_rows=head_chunk_rows))
    grads = []
    engine.fit(batches, callback=lambda entry: grads.append(engine.store.grad[0].view(96, 64).clone()))
    model = load_hf(src)
    for step, got in enumerate(grads):
        model.zero_grad()
        group = batches[2 * step:2 * step + 2]
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
        for b in group:
            logits = model(input_ids=b["input_ids"]).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), b["labels"][:, 1:].reshape(-1),
                                              ignore_index=-100, reduction="sum").div(tokens).backward()
        want = model.model.embed_tokens.weight.grad
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=f"step {step + 1}")

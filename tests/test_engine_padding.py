"""Padding against transformers + torch AdamW (fp32, 1e-4): the pad token's embedding row (nn.Embedding's
padding_idx), left and right padding with attention_mask, the pad id inside packed rows; tied and untied."""
import pytest
import torch
from safetensors.torch import load_file

import horizon_triton as ht
from hf_reference import load_hf, make_hf_model, reference_train

OPT = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)
VOCAB = 96


def _model(tmp_path, family, pad_id, zero_pad_row=True):
    """A saved checkpoint with pad_token_id; transformers starts the pad row at zeros, as real checkpoints often
    keep it; with zero_pad_row=False it is an ordinary row (a pad that is also a real token, such as eos)."""
    src = tmp_path / "src"
    model = make_hf_model(family, src, pad_token_id=pad_id)
    assert model.model.embed_tokens.padding_idx == pad_id
    assert model.model.embed_tokens.weight[pad_id].abs().sum() == 0
    if not zero_pad_row:
        with torch.no_grad():
            model.model.embed_tokens.weight[pad_id].normal_(0, 0.02)
        model.save_pretrained(src)
    return src


def _padded_batches(n, side, pad_id, batch=3, seq=12, seed=1):
    """Rows of 5..seq tokens (one full) padded on ``side`` with pad_id; the pad id also occurs among the real
    tokens. labels = input_ids: the engine must keep the padding out of the loss by the attention_mask alone."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        ids[:, [4, 9]] = pad_id                      # a real token in every row, whichever side is padded
        lengths = torch.randint(5, seq, (batch,), generator=g)
        lengths[0] = seq
        real = torch.arange(seq)[None, :] < lengths[:, None]
        mask = real if side == "right" else real.flip(1)
        ids[~mask] = pad_id
        out.append({"input_ids": ids, "attention_mask": mask.long(), "labels": ids.clone()})
    return out


def _hf_labels(batch):
    """The same batch as transformers wants it: -100 on the padding, and on a left-padded row's first token,
    which only the padding before it could predict."""
    mask = batch["attention_mask"].bool()
    labels = batch["input_ids"].masked_fill(~mask, -100)
    labels[:, 1:][~mask[:, :-1]] = -100
    return dict(batch, labels=labels)


def _train_both(src, engine_batches, reference_batches):
    engine = ht.Engine(ht.ModelConfig.from_pretrained(src), ht.TrainConfig(**OPT, compute_dtype="float32",
                                                                            device="cpu"))
    history = engine.fit(engine_batches)
    reference = load_hf(src)
    return engine, history, reference, reference_train(reference, reference_batches, **OPT)


def _assert_match(tmp_path, engine, history, reference, ref):
    for got, want in zip(history, ref, strict=True):
        assert got["tokens"] == want["tokens"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    engine.save_pretrained(tmp_path / "out")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = reference.state_dict()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("family", ["llama", "llama_tied_bias"])
def test_left_padding_with_a_zero_pad_row_matches_transformers(tmp_path, family):
    """The reported case: pad 0 with a zero row, left padding, no attention_mask. The pad row's gradient through
    the RMSNorm of a zero vector is ~1/sqrt(eps) large; nn.Embedding(padding_idx) drops it, and so must we."""
    src = _model(tmp_path, family, pad_id=0)
    batches = [dict(input_ids=b["input_ids"], labels=_hf_labels(b)["labels"])
               for b in _padded_batches(4, "left", pad_id=0)]
    engine, history, reference, ref = _train_both(src, batches, batches)
    assert max(r["grad_norm"] for r in ref) < 20      # a sane norm: clipping leaves the updates alone
    _assert_match(tmp_path, engine, history, reference, ref)


@pytest.mark.parametrize("family,side,pad_id", [
    ("llama", "left", 0), ("llama", "right", 7), ("llama_tied_bias", "left", 7), ("llama_tied_bias", "right", 0),
    ("mistral", "left", 0), ("qwen2", "right", 7), ("qwen3", "left", 7),
])
def test_attention_mask_matches_transformers(tmp_path, family, side, pad_id):
    src = _model(tmp_path, family, pad_id, zero_pad_row=pad_id == 0)
    batches = _padded_batches(3, side, pad_id)
    engine, history, reference, ref = _train_both(src, batches, [_hf_labels(b) for b in batches])
    _assert_match(tmp_path, engine, history, reference, ref)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pad_id_inside_packed_rows_matches_transformers(tmp_path, family):
    """Packed rows (restarting position_ids, no attention_mask) where the pad id ends each document and fills
    the tail: its row gets only the tied head's gradient, as in transformers."""
    pad = 5
    src = _model(tmp_path, family, pad, zero_pad_row=False)
    g = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, 16), generator=g)
        ids[:, [5, 11]] = pad                        # documents of 6, 6 and 4 tokens; the last is padding
        ids[:, 12:] = pad
        pos = torch.cat((torch.arange(6), torch.arange(6), torch.arange(4))).expand(2, 16)
        labels = ids.clone()
        labels[:, [0, 6]] = -100
        labels[:, 12:] = -100
        batches.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    engine, history, reference, ref = _train_both(src, batches, batches)
    _assert_match(tmp_path, engine, history, reference, ref)


@pytest.mark.parametrize("side", ["left", "right"])
def test_masked_logits_equal_transformers_and_the_unpadded_rows(tmp_path, side):
    src = _model(tmp_path, "qwen3", pad_id=0)
    batch = _padded_batches(1, side, pad_id=0)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    engine = ht.Engine(ht.ModelConfig.from_pretrained(src), ht.TrainConfig(device="cpu", compute_dtype="float32"))
    got = engine.logits(ids, attention_mask=mask)
    reference = load_hf(src)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask.long()).logits
        torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)
        for row in range(ids.shape[0]):          # the same as each row alone, without padding
            alone = reference(input_ids=ids[row][mask[row]][None]).logits[0]
            torch.testing.assert_close(got[row][mask[row]], alone, atol=1e-4, rtol=1e-4)


def test_labels_on_the_padding_do_not_count(tmp_path):
    """attention_mask alone keeps the padding out of the loss: labels=input_ids or -100 there give one result."""
    src = _model(tmp_path, "llama", pad_id=0)
    cfg = ht.ModelConfig.from_pretrained(src)
    batches = _padded_batches(2, "left", pad_id=0)
    runs = []
    for bs in (batches, [_hf_labels(b) for b in batches]):
        engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", compute_dtype="float32", lr=1e-3))
        runs.append([(h["loss"], h["grad_norm"], h["tokens"]) for h in engine.fit(bs)])
    assert runs[0] == runs[1]
    assert runs[0][0][2] == sum(int(m.sum()) - 1 for m in batches[0]["attention_mask"])

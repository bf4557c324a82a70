"""Batches in the shapes users have (BatchEncoding, 1-D datasets rows, ragged rows, lists of examples) give what
the equivalent padded [B, S] batch gives; bad masks, positions and pad ids are named errors."""
import json

import pytest
import torch
import transformers

import horizon_triton as ht
from hf_reference import load_hf, make_hf_model

CFG = ht.preset("tiny", pad_token_id=0, max_position_embeddings=32)


def _history(batches, cfg=CFG):
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", compute_dtype="float32", lr=1e-3))
    return [(h["loss"], h["grad_norm"], h["tokens"]) for h in engine.fit(batches)]


def _rows(lengths=(7, 11, 4), seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g) for n in lengths]


def _padded(rows):
    """The explicit right-padded batch with its attention_mask."""
    S = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), S, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def test_batch_encoding_is_accepted():
    batch = _padded(_rows())
    assert _history([transformers.BatchEncoding(batch)]) == _history([batch])


def test_single_1d_examples_are_batches_of_one():
    rows = _rows()
    as_lists = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows]      # datasets rows
    as_2d = [{"input_ids": r[None], "labels": r[None]} for r in rows]
    assert _history(as_lists) == _history(as_2d)


def test_ragged_rows_and_lists_of_examples_are_collated():
    rows = _rows()
    want = _history([_padded(rows)])
    columns = {"input_ids": [r.tolist() for r in rows], "labels": [r.tolist() for r in rows]}
    examples = [{"input_ids": r, "labels": r, "token_type_ids": torch.zeros_like(r)} for r in rows]
    assert _history([columns]) == want
    assert _history([examples]) == want


def test_collated_rows_keep_their_own_masks_and_positions():
    rows = _rows((6, 9))
    masks = [torch.tensor([0, 1, 1, 1, 1, 1]), torch.ones(9, dtype=torch.long)]   # row 0 is left-padded too
    positions = [torch.arange(6), torch.cat((torch.arange(4), torch.arange(5)))]    # row 1 packs two documents
    examples = [{"input_ids": r, "labels": r, "attention_mask": m, "position_ids": p}
                for r, m, p in zip(rows, masks, positions)]
    padded = _padded(rows)
    padded["attention_mask"][0, 0] = 0
    padded["labels"][0, 0] = -100
    padded["position_ids"] = torch.zeros(2, 9, dtype=torch.long)
    for i, p in enumerate(positions):
        padded["position_ids"][i, :len(p)] = p
    assert _history([examples]) == _history([padded])


@pytest.mark.parametrize("change,message", [
    (lambda b: b.update(labels=[r[:-1] for r in b["labels"]]), r"row 0 of labels has shape \(6,\).*7 tokens"),
    (lambda b: b.update(labels=b["labels"][:2]), "2 rows of labels for 3 rows"),
])
def test_ragged_rows_that_do_not_line_up_are_named(change, message):
    rows = _rows()
    batch = {"input_ids": [r.tolist() for r in rows], "labels": [r.tolist() for r in rows]}
    change(batch)
    with pytest.raises(ValueError, match=message):
        _history([batch])


def test_examples_with_different_keys_are_named():
    rows = _rows()
    examples = [{"input_ids": r, "labels": r} for r in rows]
    examples[1]["attention_mask"] = torch.ones_like(rows[1])
    with pytest.raises(ValueError, match="batch 0: example 1 has keys"):
        _history([examples])


def test_bad_attention_mask_is_named():
    batch = _padded(_rows())
    batch["attention_mask"][0, 0] = 2
    with pytest.raises(ValueError, match="batch 0: attention_mask must hold 0 .* and 1"):
        _history([batch])
    batch["attention_mask"] = batch["attention_mask"][:, :-1]
    with pytest.raises(ValueError, match="attention_mask shape"):
        _history([batch])


def test_missing_labels_say_what_to_pass():
    with pytest.raises(ValueError, match="no 'labels'.*labels=input_ids"):
        _history([{"input_ids": _rows()[0]}])


# ---- positions -------------------------------------------------------------------------------------------
def test_sequence_longer_than_max_position_embeddings_is_an_error():
    ids = torch.randint(1, 64, (1, 33))
    with pytest.raises(ValueError, match=r"batch 0: position 32 .* beyond the 32 positions"):
        _history([{"input_ids": ids, "labels": ids}])
    # packed documents may fill a longer row: what counts is each token's position
    pos = torch.cat((torch.arange(20), torch.arange(13)))[None]
    _history([{"input_ids": ids, "labels": ids, "position_ids": pos}])


def test_rope_scaling_stretches_the_positions_as_the_config_says(tmp_path):
    scaling = {"rope_type": "linear", "factor": 2.0}
    make_hf_model("llama", tmp_path, max_position_embeddings=16, rope_scaling=scaling,
                  rope_parameters=dict(scaling, rope_theta=10000.0))
    cfg = ht.ModelConfig.from_pretrained(tmp_path)
    assert cfg.max_positions == 32
    ids = torch.randint(0, 96, (1, 32))
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", compute_dtype="float32"))
    with torch.no_grad():
        want = load_hf(tmp_path)(ids).logits
    torch.testing.assert_close(engine.logits(ids), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="beyond the 32 positions .*rope scaling"):
        engine.logits(torch.randint(0, 96, (1, 33)))


def test_negative_position_ids_are_an_error():
    ids = torch.randint(1, 64, (1, 8))
    with pytest.raises(ValueError, match="position_ids must be ≥ 0"):
        _history([{"input_ids": ids, "labels": ids, "position_ids": torch.arange(-1, 7)[None]}])


# ---- the pad token -------------------------------------------------------------------------------------------
def test_pad_token_id_outside_the_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="pad_token_id 64 is outside the vocabulary"):
        ht.preset("tiny", pad_token_id=64)


def test_pad_token_id_round_trips_and_starts_as_a_zero_row(tmp_path):
    engine = ht.Engine(ht.preset("tiny", pad_token_id=3), ht.TrainConfig(device="cpu", compute_dtype="float32"))
    embed = engine.store.layouts[0].views(engine.store.master[0])["embed"]
    assert embed[3].abs().sum() == 0 and embed[4].abs().sum() > 0      # as nn.Embedding(padding_idx=3) starts
    engine.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["pad_token_id"] == 3
    assert ht.ModelConfig.from_pretrained(tmp_path).pad_token_id == 3
    assert load_hf(tmp_path).model.embed_tokens.padding_idx == 3

"""HF checkpoints in and out (config spellings, sharding, rope scaling) and clear errors on bad input."""
import json

import pytest
import torch

import horizon_triton as ht
from horizon_triton.state import checkpoint
from hf_reference import load_hf, make_hf_model, random_batches


def _engine(path, **train):
    return ht.Engine(ht.ModelConfig.from_pretrained(path), ht.TrainConfig(device="cpu", compute_dtype="float32",
                                                                           **train))


# ---- configs -------------------------------------------------------------------------------------------
def test_both_rope_spellings_read_the_same(tmp_path):
    make_hf_model("llama", tmp_path, rope_theta=5e5)
    hf = json.loads((tmp_path / "config.json").read_text())
    rope = hf.pop("rope_parameters", None) or {"rope_type": "default", "rope_theta": hf.pop("rope_theta")}
    v4 = dict(hf, rope_theta=rope["rope_theta"])
    v5 = dict(hf, rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]})
    cfgs = []
    for name, spelled in (("v4", v4), ("v5", v5)):
        (tmp_path / "config.json").write_text(json.dumps(spelled))
        cfgs.append(ht.ModelConfig.from_pretrained(tmp_path))
    assert cfgs[0].rope_theta == cfgs[1].rope_theta == 5e5


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 5e5}
    original = make_hf_model("llama", tmp_path, rope_theta=5e5, rope_scaling=scaling, rope_parameters=scaling)
    cfg = ht.ModelConfig.from_pretrained(tmp_path)
    assert cfg.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, 96, (1, 40))
    with torch.no_grad():
        want = original(ids).logits
    torch.testing.assert_close(_engine(tmp_path).logits(ids), want, atol=1e-4, rtol=1e-4)


def test_architecture_without_decoder_layers_is_named(tmp_path):
    """Any decoder goes to the generic template; a model it cannot stream (GPT-2's blocks are no `layers` list)
    is refused when its config is read, naming the model type."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"'gpt2'.*decoder layer list"):
        ht.ModelConfig.from_pretrained(tmp_path)


def test_unsupported_rope_type_is_an_error(tmp_path):
    make_hf_model("llama", tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    hf.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="yarn"):
        ht.ModelConfig.from_pretrained(tmp_path)


# ---- weights in ----------------------------------------------------------------------------------------
def test_truncated_safetensors_is_a_clear_error(tmp_path):
    make_hf_model("llama", tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        _engine(tmp_path)


def test_missing_shard_is_a_clear_error(tmp_path):
    make_hf_model("llama", tmp_path)
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="00001-of-00002"):
        _engine(tmp_path)


def test_wrong_tensor_shape_is_named(tmp_path):
    make_hf_model("llama", tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    hf["intermediate_size"] = 120
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        _engine(tmp_path)


# ---- weights out ---------------------------------------------------------------------------------------
def test_sharded_save_round_trips(tmp_path, monkeypatch):
    original = make_hf_model("qwen2", tmp_path / "src")
    engine = _engine(tmp_path / "src")
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 20_000)
    engine.save_pretrained(tmp_path / "out")
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path / "out")(ids).logits, original(ids).logits)
    torch.testing.assert_close(_engine(tmp_path / "out").logits(ids), original(ids).logits.detach(),
                               atol=1e-4, rtol=1e-4)


def test_saving_over_a_checkpoint_keeps_the_users_other_files(tmp_path):
    make_hf_model("llama", tmp_path / "src")
    engine = _engine(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    engine.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    make_hf_model("llama", tmp_path / "src")
    engine = _engine(tmp_path / "src")

    def explode(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_file", explode)
    with pytest.raises(KeyboardInterrupt):
        engine.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


# ---- data ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine():
    return ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu"))


def test_token_id_outside_vocab_is_named(tiny_engine):
    batch = random_batches(1, vocab=64)[0]
    batch["input_ids"][0, 3] = 64
    with pytest.raises(ValueError, match=r"batch 0: token id 64 .*\[0, 64\)"):
        tiny_engine.fit([batch])


def test_label_shape_mismatch_is_named(tiny_engine):
    batch = random_batches(1, vocab=64)[0]
    batch["labels"] = batch["labels"][:, :-1]
    with pytest.raises(ValueError, match="labels shape"):
        tiny_engine.fit([batch])


def test_empty_loader_is_an_error(tiny_engine):
    with pytest.raises(ValueError, match="no batches"):
        tiny_engine.fit([])


def test_step_without_label_tokens_is_an_error(tiny_engine):
    batch = random_batches(1, vocab=64)[0]
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no label tokens"):
        tiny_engine.fit([batch])

"""Faults the engine itself must catch: divergence (a non-finite loss or gradient norm stops the run before the
update, keeps every checkpoint finite, and no non-finite model is ever written), hyperparameters torch's AdamW
refuses, a config.json with fewer layers than its weights, a corrupted checkpoint (checksums), and a fit that
takes no step (it must not fix the lr schedule's length). The CLI's faults are in test_run_faults.py."""
import json
import math

import pytest
import torch

import horizon_triton as ht
from horizon_triton.state import training_state
from horizon_triton.engine import Diverged
from hf_reference import make_hf_model, random_batches

FP32 = dict(device="cpu", compute_dtype="float32")


def _all_finite(directory) -> bool:
    from safetensors import safe_open
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            if not all(torch.isfinite(f.get_tensor(name)).all() for name in f.keys()):
                return False
    return True


# ---- divergence ----------------------------------------------------------------------------------------------
def test_divergence_stops_before_the_update_and_keeps_the_checkpoints_finite(tmp_path):
    """lr 1e30: step 1 is finite (the initial weights), its update makes the weights ~1e30, step 2's logits
    overflow. The run stops at step 2 with the weights of step 1; a checkpoint every step, keeping 2: the
    finite ones stay and no non-finite one is written."""
    cfg = ht.preset("tiny")
    root = tmp_path / "ckpt"
    engine = ht.Engine(cfg, ht.TrainConfig(lr=1e30, max_grad_norm=None, checkpoint_dir=str(root), save_every_steps=1,
                                           keep_last=2, **FP32))
    with pytest.raises(Diverged, match=r"training diverged at step 2: loss nan.*not applied.*after step 1.*step-0+1"):
        engine.fit(random_batches(6, vocab=cfg.vocab_size))
    assert engine.step == 1
    assert [step for step, _ in training_state.checkpoints(root)] == [1]
    assert _all_finite(training_state.checkpoints(root)[0][1])
    before = {name: t.clone() for name, t in engine.store.named_master()}
    engine.save_pretrained(tmp_path / "model", dtype="float32")       # the weights of step 1: finite, saved
    assert all(torch.isfinite(t).all() for t in before.values())
    engine.close()


def test_a_non_finite_model_is_never_written(tmp_path):
    cfg = ht.preset("tiny")
    engine = ht.Engine(cfg, ht.TrainConfig(**FP32))
    name, layer, param = next((n, i, p) for n, i, p in engine.store.named_params() if "layers.1." in n)
    engine.store.set_master(layer, torch.full(param.shape, float("nan")), param.offset)
    out = tmp_path / "model"
    with pytest.raises(ValueError, match=rf"{name} has non-finite values.*not saving"):
        engine.save_pretrained(out)
    assert not out.exists() and not list(tmp_path.iterdir())      # nothing half written, no temporary left
    engine.close()


@pytest.mark.parametrize("setting", [dict(lr=-1e-3), dict(lr=float("nan")), dict(betas=(0.9, 1.0)), dict(betas=(-0.1, 0.95)), dict(weight_decay=-0.1),
                                     dict(eps=-1e-8)])
def test_train_config_refuses_what_torch_adamw_refuses(setting):
    """The reference: torch.optim.AdamW raises for each of these too."""
    with pytest.raises(ValueError):
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], **setting)
    with pytest.raises(ValueError, match=next(iter(setting))):
        ht.TrainConfig(**setting)


@pytest.mark.parametrize("setting,match", [(dict(eps=0.0), "eps must be a finite number > 0"),
                                           (dict(lr=float("inf")), "lr must be a finite number ≥ 0"),
                                           (dict(warmup_steps=-1), "warmup_steps must be an int ≥ 0"),
                                           (dict(max_grad_norm=-1.0), "max_grad_norm must be a finite number ≥ 0"),
                                           (dict(max_grad_norm=float("nan")), "max_grad_norm")])
def test_train_config_refuses_zero_eps_infinite_lr_and_negative_warmup_or_clipping(setting, match):
    with pytest.raises(ValueError, match=match):
        ht.TrainConfig(**setting)


def test_train_config_still_accepts_the_edges():
    ht.TrainConfig(lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0)
    assert ht.TrainConfig(betas=[0.9, 0.99]).betas == (0.9, 0.99)


# ---- the lr schedule -----------------------------------------------------------------------------------------
def test_a_fit_that_takes_no_step_does_not_fix_the_schedule(tmp_path):
    """fit([]) and fit(max_steps=0) before a cosine fit of 4 steps: the lrs are those of a fresh engine's 4-step
    cosine (itself checked against transformers in test_engine_hf.py), not a schedule of length 0."""
    cfg = ht.preset("tiny")
    settings = dict(lr=1e-3, lr_schedule="cosine", warmup_steps=1, **FP32)
    fresh = ht.Engine(cfg, ht.TrainConfig(**settings))
    expected = [h["lr"] for h in fresh.fit(random_batches(4, vocab=cfg.vocab_size))]
    fresh.close()
    engine = ht.Engine(cfg, ht.TrainConfig(**settings))
    with pytest.raises(ValueError, match="no batches"):
        engine.fit([])
    assert engine.fit(random_batches(4, vocab=cfg.vocab_size), max_steps=0) == [] and engine.step == 0
    lrs = [h["lr"] for h in engine.fit(random_batches(4, vocab=cfg.vocab_size))]
    assert lrs == expected and lrs[-1] > 0 and len(set(lrs)) == 4
    assert lrs == [settings["lr"] * (0.5 * (1 + math.cos(math.pi * (s - 2) / 3)) if s > 1 else 0.0)
                   for s in range(1, 5)]
    with pytest.raises(ValueError, match="max_steps must be an int ≥ 0"):
        engine.fit(random_batches(1, vocab=cfg.vocab_size), max_steps=-1)
    engine.close()


# ---- what a checkpoint is checked against ----------------------------------------------------------------------
def test_a_config_with_fewer_layers_than_the_weights_is_refused(tmp_path):
    """transformers flags the third layer's tensors as unexpected; the engine must not train two layers of a
    three-layer model in silence."""
    src = tmp_path / "src"
    make_hf_model("llama", src, num_hidden_layers=3)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds 3 decoder layers, its config.json says num_hidden_layers 2"):
        ht.Engine(ht.ModelConfig.from_pretrained(src), ht.TrainConfig(**FP32))


def test_a_corrupted_checkpoint_is_refused_by_its_checksum(tmp_path):
    cfg = ht.preset("tiny")
    engine = ht.Engine(cfg, ht.TrainConfig(**FP32))
    engine.fit(random_batches(2, vocab=cfg.vocab_size))
    saved = engine.save_checkpoint(tmp_path / "ckpt")
    engine.close()
    manifest = json.loads((saved / training_state.MANIFEST).read_text())
    assert set(manifest["checksums"]) == set(manifest["files"])
    ht.Engine.from_checkpoint(saved).close()                   # whole: loads
    shard = next(saved.glob("state-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40                               # one bit, same size: only a checksum sees it
    shard.write_bytes(bytes(data))
    with pytest.raises(training_state.CheckpointError, match=rf"{shard.name} is corrupted: its checksum"):
        ht.Engine.from_checkpoint(saved)
    # a checkpoint written before checksums existed is checked by size only, as before
    del manifest["checksums"]
    (saved / training_state.MANIFEST).write_text(json.dumps(manifest))
    ht.Engine.from_checkpoint(saved).close()

"""Training checkpoints: bit-exact resume in a new process, the format (standard safetensors, any store layout),
refusal of truncated, foreign and mismatched checkpoints, rotation and leftovers, SIGINT/SIGTERM during fit and
save_pretrained. The kill -9 trials are in test_kill_during_save.py, the CLI's resume in test_cli.py."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import horizon_triton as ht
from horizon_triton.state import durable, interrupts, training_state
from horizon_triton.host.store import HostStore
from checkpoint_worker import ACCUM, CONFIGS, K, N, batches

WORKER = Path(__file__).with_name("checkpoint_worker.py")


def _worker(*args, timeout=300):
    result = subprocess.run([sys.executable, str(WORKER), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, HORIZON_KERNELS="torch"))
    assert result.returncode == 0, result.stderr
    return result


def _state(store: HostStore) -> dict:
    return {f"{store.layouts[layer].name}.{kind}": t for kind, layer, t in store.state_buffers()}


def _files_tensors(directory: Path) -> dict:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


# ---- bit-exact resume --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """Every config: K steps of an N-step run and a checkpoint in one process, the rest in a second one."""
    root = tmp_path_factory.mktemp("resume")
    _worker("first", root)
    _worker("rest", root)
    return root


@pytest.mark.parametrize("name", list(CONFIGS))
def test_resume_in_a_new_process_is_bit_exact(resumed_runs, name, tmp_path):
    cfg = ht.preset("tiny")
    straight = ht.Engine(cfg, ht.TrainConfig(**CONFIGS[name]))
    history = straight.fit(batches(cfg.vocab_size, 0, N * ACCUM), max_steps=N)
    first = json.loads((resumed_runs / f"{name}-first.json").read_text())
    rest = json.loads((resumed_runs / f"{name}-rest.json").read_text())
    assert [h["step"] for h in first + rest] == list(range(1, N + 1))
    # the conditions the resume must carry across: warm-up spanning step K, clipping at every step, decay
    assert history[K - 1]["lr"] < history[K]["lr"] and CONFIGS[name]["warmup_steps"] > K
    assert all(h["grad_norm"] > CONFIGS[name]["max_grad_norm"] for h in history)
    for key in ("loss", "grad_norm", "lr"):
        assert [h[key] for h in first + rest] == [h[key] for h in history], key
    saved = _files_tensors(resumed_runs / f"{name}-final" / f"step-{N:08d}")
    for tensor_name, t in _state(straight.store).items():
        assert torch.equal(saved[tensor_name], t), tensor_name
    straight.save_pretrained(tmp_path / "model", dtype="float32")
    theirs, ours = _files_tensors(resumed_runs / f"{name}-model"), _files_tensors(tmp_path / "model")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


# ---- the format ----------------------------------------------------------------------------------------------
@pytest.fixture
def trained(tmp_path):
    engine = ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu", lr=1e-2))
    engine.fit(list(batches(64, 0, 3)))
    return engine


def test_checkpoint_is_standard_safetensors_described_by_its_manifest(trained, tmp_path):
    path = trained.save_checkpoint(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "step-00000003"
    manifest = json.loads((path / "manifest.json").read_text())
    tensors = _files_tensors(path)
    state = _state(trained.store)
    assert tensors.keys() == state.keys() == manifest["tensors"].keys()
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    kinds = {(a.kind, a.layer): a for a in trained.store.allocations}
    for name, entry in manifest["tensors"].items():
        a = kinds[(entry["kind"], entry["layer"])]
        assert (entry["dtype"], entry["numel"]) == (str(a.dtype).replace("torch.", ""), a.numel)
    kinds_held = {a.kind for a in trained.store.allocations if a.kind != "grad"}     # the default: split master
    assert {e["kind"] for e in manifest["tensors"].values()} == kinds_held == {"working", "master_low", "exp_avg",
                                                                               "exp_avg_sq"}
    assert manifest["files"] == {f.name: f.stat().st_size for f in path.iterdir() if f.name != "manifest.json"}
    trainer = json.loads((path / "trainer_state.json").read_text())
    assert (trainer["step"], trainer["micro_batches"], trainer["schedule"]["total_steps"]) == (3, 3, 3)


def test_shards_hold_whole_layers_and_round_trip(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(training_state, "SHARD_BYTES", 1)
    path = trained.save_checkpoint(tmp_path / "ckpt")
    manifest = json.loads((path / "manifest.json").read_text())
    files = {}
    for entry in manifest["tensors"].values():
        files.setdefault(entry["file"], set()).add(entry["layer"])
    assert len(files) == trained.store.num_layers and all(len(layers) == 1 for layers in files.values())
    loaded = ht.Engine.from_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(a, b) for a, b in zip(_state(loaded.store).values(), _state(trained.store).values()))
    assert (loaded.step, loaded.micro_batches) == (3, 3)


def test_any_store_layout_saves_and_is_checked_without_changes(tmp_path):
    """The 8-bit layout (int16 low halves, 8-bit moment codes, fp32 block scales) saves and loads through the same code,
    and a checkpoint of one layout is refused by a store of another, naming the kinds."""
    cfg = ht.preset("tiny")
    store = HostStore(cfg, torch.bfloat16, optimizer_states="8bit")
    for _, _, t in store.state_buffers():
        t.copy_(torch.randint(-100, 100, t.shape).to(t.dtype))
    path = training_state.save(store, tmp_path, {"step": 7})
    manifest = json.loads((path / "manifest.json").read_text())
    assert {e["dtype"] for e in manifest["tensors"].values()} >= {"bfloat16", "int16", "uint8", "float32"}
    again = HostStore(cfg, torch.bfloat16, optimizer_states="8bit")
    training_state.load_into(again, path, manifest)
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(again.state_buffers(), store.state_buffers()))
    with pytest.raises(training_state.CheckpointError, match=r"the checkpoint has kinds \['exp_avg_q', "
                                                             r"'exp_avg_scale', 'exp_avg_sq_q', 'exp_avg_sq_scale'\] "
                                                             r"that this store lacks"):
        training_state.load_into(HostStore(cfg, torch.bfloat16), path, manifest)


# ---- refused checkpoints -------------------------------------------------------------------------------------
def test_truncated_shard_is_refused_before_anything_is_loaded(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(training_state, "SHARD_BYTES", 1)
    path = trained.save_checkpoint(tmp_path / "ckpt")
    last = sorted(path.glob("state-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    other = ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu", seed=5))
    before = {k: t.clone() for k, t in _state(other.store).items()}
    with pytest.raises(training_state.CheckpointError, match=rf"{last.name} has \d+ bytes, the manifest says"):
        other.load_checkpoint(path)
    assert all(torch.equal(before[k], t) for k, t in _state(other.store).items()) and other.step == 0


def test_foreign_and_incomplete_directories_are_refused(tmp_path):
    from hf_reference import make_hf_model
    make_hf_model("llama", tmp_path / "hf")
    with pytest.raises(training_state.CheckpointError, match="no complete checkpoint"):
        ht.Engine.from_checkpoint(tmp_path / "hf")
    (tmp_path / "hf" / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(training_state.CheckpointError, match="not a horizon-triton training checkpoint"):
        ht.Engine.from_checkpoint(tmp_path / "hf")
    (tmp_path / "half" / "step-00000004").mkdir(parents=True)
    with pytest.raises(training_state.CheckpointError, match="interrupted"):
        ht.Engine.from_checkpoint(tmp_path / "half")
    with pytest.raises(training_state.CheckpointError, match="does not exist"):
        ht.Engine.from_checkpoint(tmp_path / "nowhere")


def test_checkpoint_of_another_model_names_the_difference(trained, tmp_path):
    path = trained.save_checkpoint(tmp_path / "ckpt")
    wider = ht.Engine(ht.preset("tiny", hidden_size=96), ht.TrainConfig(device="cpu"))
    with pytest.raises(training_state.CheckpointError, match="hidden_size: checkpoint 64, this model 96"):
        wider.load_checkpoint(path)
    with pytest.raises(training_state.CheckpointError, match="compute_dtype: checkpoint 'bfloat16', this engine "
                                                             "'float32'"):
        ht.Engine.from_checkpoint(path, ht.TrainConfig(device="cpu", compute_dtype="float32"))


# ---- rotation and leftovers ----------------------------------------------------------------------------------
def test_keep_last_and_leftovers_of_killed_saves(trained, tmp_path):
    root = tmp_path / "ckpt"
    dead = 2**22 + 12345                           # above any pid_max: no such process
    leftover = root / f".step-00000002.partial-{dead}-abc"
    leftover.mkdir(parents=True)
    (leftover / "state-00001-of-00001.safetensors").write_bytes(b"half")
    trained.save_checkpoint(root, keep_last=2)
    assert not leftover.exists()
    trained.fit(batches(64, 3, 5))
    trained.save_checkpoint(root, keep_last=2)
    trained.fit(batches(64, 5, 6))
    trained.save_checkpoint(root, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000005", "step-00000006"]
    assert ht.Engine.from_checkpoint(root).step == 6


def test_a_swap_cut_short_is_finished_by_the_next_save(tmp_path):
    """The kill came after the new model directory was swapped in, before the run's checkpoints moved over (or,
    without RENAME_EXCHANGE, between the two renames): the next save repairs either."""
    dead = 2**22 + 12345
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    old = tmp_path / f".out.partial-{dead}-xyz"
    (old / "checkpoints" / "step-00000001").mkdir(parents=True)
    (old / "config.json").write_text('{"old": 1}')
    (old / durable.SWAPPED_OUT).write_text('["checkpoints"]')
    durable.clean_stale(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json"] and not old.exists()
    assert (out / "config.json").read_text() == "{}"
    out_renamed = tmp_path / f".out.partial-{dead}-xyz-old"
    out.rename(out_renamed)
    (out_renamed / durable.SWAPPED_OUT).write_text("[]")
    durable.clean_stale(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_save_pretrained_swaps_in_whole_and_moves_the_runs_other_entries(trained, tmp_path, monkeypatch,
                                                                         exchange):
    if not exchange:
        monkeypatch.setattr(durable, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    (out / "checkpoints" / "step-00000001").mkdir(parents=True)
    (out / "model-00001-of-00002.safetensors").write_text("stale shard")
    trained.save_pretrained(out, add_files=lambda tmp: (tmp / "tokenizer.json").write_text("{}"))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "model.safetensors",
                                                      "tokenizer.json"]
    assert (out / "checkpoints" / "step-00000001").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- signals -------------------------------------------------------------------------------------------------
def _signal_at(step, signum, times=1):
    def callback(entry):
        if entry["step"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
    return callback


@pytest.mark.parametrize("signum,error,status", [(signal.SIGINT, interrupts.Interrupted, None),
                                                 (signal.SIGTERM, interrupts.Terminated, 143)])
def test_signal_during_fit_finishes_the_step_saves_and_stops(tmp_path, signum, error, status):
    engine = ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu", checkpoint_dir=str(tmp_path)))
    before = signal.getsignal(signal.SIGINT)     # Python's default, or SIG_IGN in a job started in the background
    with pytest.raises(error) as stopped:
        engine.fit(batches(64, 0, 6), callback=_signal_at(2, signum))
    assert engine.step == 2 and stopped.value.checkpoint == tmp_path / "step-00000002"
    if status is not None:
        assert stopped.value.code == status
    assert signal.getsignal(signal.SIGINT) is before                # fit put back what it found
    resumed = ht.Engine.from_checkpoint(tmp_path)
    assert (resumed.step, resumed.micro_batches) == (2, 2)


def test_second_signal_stops_at_once_without_a_save(tmp_path):
    engine = ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu", checkpoint_dir=str(tmp_path),
                                                         save_every_steps=1))
    with pytest.raises(interrupts.Interrupted) as stopped:
        engine.fit(batches(64, 0, 6), callback=_signal_at(3, signal.SIGINT, times=2))
    assert stopped.value.checkpoint is None
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step-00000001", "step-00000002"]


def test_signal_during_save_pretrained_is_acted_on_after_it(trained, tmp_path, monkeypatch):
    from horizon_triton.state import checkpoint
    save_file = checkpoint.save_file

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return save_file(*args, **kwargs)
    monkeypatch.setattr(checkpoint, "save_file", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        trained.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]

    def twice(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return save_file(*args, **kwargs)
    monkeypatch.setattr(checkpoint, "save_file", twice)
    with pytest.raises(KeyboardInterrupt):
        trained.save_pretrained(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]      # nothing half written


@pytest.mark.parametrize("minutes,saved", [(1e-9, [1, 2, 3]), (60.0, [])])
def test_time_based_saves(tmp_path, minutes, saved):
    engine = ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu", checkpoint_dir=str(tmp_path),
                                                         save_every_minutes=minutes))
    engine.fit(batches(64, 0, 3))
    assert [s for s, _ in training_state.checkpoints(tmp_path)] == saved

"""kill -9 at random instants while a run saves a checkpoint after every step: every time, a new process loads
the last completed save (or the one in flight, if it had completed) and trains on; after all the kills, the run
is bit-identical to one that was never interrupted.

The model (checkpoint_worker.KILL_MODEL, 2.2M parameters, 30 MB a checkpoint, fsynced) keeps each kill a few
seconds on two shared cores; half the kills are aimed inside a save (after "saving", within the time the last
save took), half fall anywhere."""
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import horizon_triton as ht
from checkpoint_worker import KILL_MODEL, KILL_TRAIN, batches

WORKER = Path(__file__).with_name("checkpoint_worker.py")
TRIALS = 12         # half aimed inside a save: 6 kills mid-write, 6 anywhere


def _start(root: Path, until: int | None = None) -> subprocess.Popen:
    args = [sys.executable, str(WORKER), "loop", str(root)] + ([str(until)] if until else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)


def _read(proc: subprocess.Popen) -> list[str]:
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"worker exited: {proc.wait()} {proc.stderr.read()}")
    return line.split()


@pytest.mark.slow
def test_kill_9_during_saves_never_loses_a_completed_checkpoint(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "ckpt"
    last_saved, save_seconds, mid_save = 0, 0.2, 0
    for trial in range(TRIALS):
        proc = _start(root)
        try:
            word, step = _read(proc)
            assert word == "resumed"
            # the last save the killed process reported, or the one it was writing if that one completed
            assert last_saved <= int(step) <= last_saved + 1, (trial, last_saved, step)
            last_saved = int(step)
            aim_inside_a_save = trial % 2 == 0
            while True:
                words = _read(proc)
                if words[0] == "saved":
                    last_saved, save_seconds = int(words[1]), float(words[2])
                    if not aim_inside_a_save:
                        break
                elif words[0] == "saving" and aim_inside_a_save and last_saved > int(step):
                    break
            time.sleep(rng.uniform(0, save_seconds if aim_inside_a_save else save_seconds + 0.3))
        finally:
            proc.kill()
            proc.wait()
        for words in map(str.split, proc.stdout.read().splitlines()):   # what it said before it died
            if words and words[0] == "saved":
                last_saved = int(words[1])
        proc.stdout.close()
        proc.stderr.close()
        mid_save += any(".partial-" in p.name for p in root.iterdir())
    assert mid_save >= TRIALS // 4, f"only {mid_save} of {TRIALS} kills landed inside a save"

    until = last_saved + 2
    proc = _start(root, until)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.split()[-2:] == ["done", str(until)]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]      # leftovers cleaned by the saves

    straight = ht.Engine(ht.ModelConfig(**KILL_MODEL), ht.TrainConfig(**KILL_TRAIN))
    straight.fit(batches(KILL_MODEL["vocab_size"], 0, until))
    with safe_open(str(root / f"step-{until:08d}" / "state-00001-of-00001.safetensors"), framework="pt") as f:
        for kind, layer, t in straight.store.state_buffers():
            assert torch.equal(f.get_tensor(f"{straight.store.layouts[layer].name}.{kind}"), t), (kind, layer)

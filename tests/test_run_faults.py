"""The command line's run directory under faults: a signal during the final evaluation, --out a mount point (a
tmpfs the test mounts; skipped where mounting is refused), --overwrite next to the run's inputs, a full disk or an
unwritable --out at the final save, two runs on one --out, inputs edited before --resume, and a kill during data
preparation. The engine's own faults (divergence, checksums, ...) are in test_engine_faults.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_reference import load_hf, make_hf_model
from horizon_triton.state import checkpoint, durable
from horizon_triton import cli
from horizon_triton.cli import rundir
from horizon_triton.engine import Engine
from test_cli import RECORDS
from tiny_tokenizers import make_tokenizer

RUN = ("--steps", "4", "--batch-size", "2", "--seq-len", "24", "--lr", "1e-3", "--device", "cpu", "--dtype",
       "float32")
ENV = dict(os.environ, HORIZON_KERNELS="torch")


@pytest.fixture
def model(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama", src)
    make_tokenizer(src)
    return src


def _jsonl(path, records=RECORDS):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _args(model, data, out, *extra):
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), *RUN, *extra]


def _lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _mount(path: Path, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=16m", *options)), "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}): needs root or "
                    "CAP_SYS_ADMIN")


@pytest.fixture
def mounts():
    mounted = []

    def mount(path: Path, *options: str) -> Path:
        _mount(path, *options)
        mounted.append(path)
        return path
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---- 1. a signal during the final evaluation -------------------------------------------------------------------
def _signal_in_final_eval(monkeypatch, signum):
    evaluate = Engine.evaluate

    def evaluate_and_signal(self, loader):
        if self.step == 4:                 # the final evaluation (the in-run ones come earlier)
            os.kill(os.getpid(), signum)
        return evaluate(self, loader)
    monkeypatch.setattr(Engine, "evaluate", evaluate_and_signal)


def test_sigint_during_the_final_evaluation_keeps_the_model_and_resume_evaluates(tmp_path, model, monkeypatch,
                                                                                  capsys):
    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "out"
    args = _args(model, data, out, "--eval-split", "0.3")
    _signal_in_final_eval(monkeypatch, signal.SIGINT)
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert "training state saved in" in err and "--resume" in err
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "step-00000004").is_dir()
    assert [line["step"] for line in _lines(out) if line["kind"] == "eval"] == []     # the cut one is not kept
    monkeypatch.undo()
    assert cli.main(args + ["--resume"]) == 0
    assert [line["step"] for line in _lines(out) if line["kind"] == "eval"] == [4]
    assert [line["step"] for line in _lines(out) if line["kind"] == "train"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_keeps_the_model(tmp_path, model):
    """Python's default SIGTERM ends the process at once: the run must not be lost (exit status 143)."""
    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "out"
    script = ("import os, signal, sys\n"
              "from horizon_triton import cli\n"
              "from horizon_triton.engine import Engine\n"
              "evaluate = Engine.evaluate\n"
              "def signalled(self, loader):\n"
              "    if self.step == 4:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return evaluate(self, loader)\n"
              "Engine.evaluate = signalled\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", script, *_args(model, data, out, "--eval-split", "0.3")],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 143, result.stderr
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "step-00000004").is_dir()
    assert "training state saved in" in result.stderr


# ---- 2. --out a mount point ---------------------------------------------------------------------------------
def test_a_mount_point_out_gets_its_model_and_resumes(tmp_path, model, mounts, capsys):
    data = _jsonl(tmp_path / "train.jsonl")
    out = mounts(tmp_path / "volume")
    assert durable.is_mount_point(out) and not durable.is_mount_point(tmp_path)
    args = _args(model, data, out, "--save-every", "2")
    assert cli.main(args) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    first = load_hf(out).model.embed_tokens.weight.clone()
    assert cli.main(args + ["--resume"]) == 0, capsys.readouterr().err     # saves over the model in place
    assert torch.equal(load_hf(out).model.embed_tokens.weight, first)
    assert cli.main(args + ["--overwrite"]) == 0, capsys.readouterr().err  # clears the mount point's entries
    assert [line["step"] for line in _lines(out)] == [1, 2, 3, 4]
    leftovers = [p.name for p in out.iterdir() if ".partial-" in p.name or p.name == durable.IN_PLACE]
    assert leftovers == []


def test_a_swap_of_a_mount_points_entries_killed_midway_is_rolled_forward(tmp_path, mounts, monkeypatch):
    out = mounts(tmp_path / "volume")
    for version in ("old", "new"):
        renames = {"n": 0}
        if version == "new":         # the save dies after two of its renames (a kill -9 in the middle)
            rename = os.rename

            def dying_rename(a, b):
                renames["n"] += 1
                if renames["n"] > 2:
                    raise KeyboardInterrupt("killed")
                rename(a, b)
            monkeypatch.setattr(os, "rename", dying_rename)
        try:
            with durable.assembled(out, keep=lambda name: name == "kept") as tmp:
                for name in ("config.json", "model.safetensors", "tokenizer.json"):
                    (tmp / name).write_text(f"{version} {name}")
                (tmp / "sub").mkdir()
                (tmp / "sub" / "file").write_text(version)
                if version == "old":
                    (tmp / "stale.bin").write_text("only in the old set")
                    (tmp / "kept").write_text("the run's")
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
    assert (out / durable.IN_PLACE).is_file()          # the journal says the new set is being swapped in
    monkeypatch.setattr(durable, "_alive", lambda pid: False)     # the killed save's process is gone
    durable.clean_stale(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "kept", "model.safetensors", "sub",
                                                     "tokenizer.json"]
    assert all((out / n).read_text() == f"new {n}" for n in ("config.json", "model.safetensors", "tokenizer.json"))
    assert (out / "sub" / "file").read_text() == "new" and (out / "kept").read_text() == "the run's"


# ---- 3. --overwrite never deletes inputs ---------------------------------------------------------------------
def test_out_holding_or_inside_the_inputs_is_refused(tmp_path, capsys):
    project = tmp_path / "project"
    make_hf_model("llama", project / "base")
    make_tokenizer(project / "base")
    data = _jsonl(project / "x.jsonl")
    before = sorted(str(p.relative_to(project)) for p in project.rglob("*"))
    assert cli.main(_args(project / "base", data, project, "--overwrite")) == 2
    assert "contains --model" in capsys.readouterr().err
    assert cli.main(_args(project / "base", data, project / "base" / "tuned")) == 2
    assert "is inside --model" in capsys.readouterr().err
    assert sorted(str(p.relative_to(project)) for p in project.rglob("*")) == before


def test_overwrite_removes_only_what_a_run_wrote(tmp_path, model, capsys):
    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(_args(model, data, out, "--overwrite")) == 2          # not a run's directory
    assert "no horizon-triton run wrote (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert cli.main(_args(model, data, out, "--save-every", "2")) == 0
    assert cli.main(_args(model, data, out, "--overwrite")) == 0          # a run's files only: replaced
    assert not (out / "checkpoints").exists() and [line["step"] for line in _lines(out)] == [1, 2, 3, 4]
    (out / "notes.txt").write_text("added after the run")
    assert cli.main(_args(model, data, out, "--overwrite")) == 2
    assert (out / "notes.txt").is_file() and (out / "model.safetensors").is_file()


# ---- 4. what AdamW refuses, the command line refuses -----------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--lr", "-1e-3"), ("--lr", "nan"), ("--warmup", "-5")])
def test_the_cli_refuses_a_negative_lr_or_warmup(tmp_path, model, capsys, flag, value):
    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "out"
    with pytest.raises(SystemExit) as refused:
        cli.main(_args(model, data, out, f"{flag}={value}"))
    assert refused.value.code == 2 and f"{flag}: must be a finite number ≥ 0" in capsys.readouterr().err
    assert not out.exists()


def test_the_cli_names_its_flags_in_the_train_configs_refusals(tmp_path, model, capsys):
    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "out"
    assert cli.main(_args(model, data, out, "--lora-rank", "2", "--lora-alpha", "-1")) == 2
    assert "error: --lora-alpha must be > 0, got -1.0" in capsys.readouterr().err


# ---- 5. the final save fails -------------------------------------------------------------------------------------
def test_an_unwritable_out_at_the_final_save_falls_back_to_a_checkpoint(tmp_path, model, monkeypatch, capsys):
    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "out"
    save_file = checkpoint.save_file

    def read_only(tensors, path, **kwargs):
        raise OSError(30, "Read-only file system", path)
    monkeypatch.setattr(checkpoint, "save_file", read_only)
    args = _args(model, data, out)
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Read-only file system (EROFS)" in err[0] and "model.safetensors" in err[0]
    assert "checkpoints/step-00000004" in err[0] and "--resume" in err[0]
    monkeypatch.setattr(checkpoint, "save_file", save_file)
    assert cli.main(args + ["--resume"]) == 0
    assert (out / "model.safetensors").is_file() and [line["step"] for line in _lines(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_full_disk_at_the_final_save_keeps_the_state_until_there_is_room(tmp_path, model, mounts):
    """A 16 MB tmpfs filled but for 256 KiB: the model (about 0.5 MB) and the checkpoint do not fit; the run says
    which path is full and retries; once the test frees the room, the model is written and the run ends well."""
    data = _jsonl(tmp_path / "train.jsonl")
    volume = mounts(tmp_path / "volume")
    ballast = volume / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * (os.statvfs(volume).f_bavail * os.statvfs(volume).f_frsize - (256 << 10)))
    out = volume / "run"
    proc = subprocess.Popen([sys.executable, "-m", "horizon_triton.cli", *_args(model, data, out)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(ENV, HORIZON_TRITON_SAVE_RETRY_S="0.5"))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "retrying every" in line:
            ballast.unlink()
            break
    _, err = proc.communicate(timeout=300)
    text = "".join(seen)
    assert proc.returncode == 0, text + err
    assert "No space left on device (ENOSPC)" in text and str(volume) in text
    assert load_hf(out) is not None and [line["step"] for line in _lines(out)] == [1, 2, 3, 4]


def test_os_errors_are_one_line_naming_the_path(tmp_path, model, mounts, capsys):
    data = _jsonl(tmp_path / "train.jsonl")
    read_only = mounts(tmp_path / "ro", "ro")
    assert cli.main(_args(model, data, read_only / "out")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(read_only) in err[0] and "Read-only file system (EROFS)" in err[0]


# ---- 6. one run at a time on an --out ----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_live_run_locks_its_out_and_a_killed_one_does_not(tmp_path, model, capsys):
    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "out"
    long_run = _args(model, data, out, "--save-every", "1")
    long_run[long_run.index("--steps") + 1] = "100000"
    proc = subprocess.Popen([sys.executable, "-m", "horizon_triton.cli", *long_run], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in proc.stdout:
            if line.startswith("step 2/"):
                break
        for second in (_args(model, data, out, "--overwrite"), long_run + ["--resume"]):
            assert cli.main(second) == 2
            err = capsys.readouterr().err
            assert f"is in use by another run (pid {proc.pid} on" in err
        assert proc.poll() is None                   # untouched: still training
    finally:
        proc.kill()                                  # kill -9: the kernel releases the lock
        proc.wait()
    assert cli.main(_args(model, data, out, "--overwrite")) == 0
    assert [line["step"] for line in _lines(out)] == [1, 2, 3, 4]


# ---- 7. --resume reads what the run started with -------------------------------------------------------------
def test_resume_refuses_edited_data(tmp_path, model, capsys):
    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "out"
    args = _args(model, data, out, "--save-every", "2")
    assert cli.main(args) == 0
    _jsonl(data, list(reversed(RECORDS)))                 # the same path, other content
    assert cli.main(args + ["--resume"]) == 2
    assert "--data changed since the run started (train.jsonl differ" in capsys.readouterr().err
    _jsonl(data)                                          # put back: resumes
    assert cli.main(args + ["--resume"]) == 0


def test_a_lora_resume_refuses_an_edited_base(tmp_path, model, capsys):
    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "out"
    args = _args(model, data, out, "--save-every", "2", "--lora-rank", "2")
    assert cli.main(args) == 0
    make_hf_model("llama", model, seed=1)                 # another base, same shapes, same path
    assert cli.main(args + ["--resume"]) == 2
    assert "--model changed since the run started (model.safetensors differ" in capsys.readouterr().err


# ---- 8. a kill during data preparation ---------------------------------------------------------------------------
def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_kill_during_data_preparation_leaves_no_rows_and_no_worker(tmp_path, model, signum):
    data, out, tmp = _jsonl(tmp_path / "big.jsonl", RECORDS * 4000), tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "horizon_triton.cli", *_args(model, data, out, "--workers", "2")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(ENV, TMPDIR=str(tmp)))
    deadline = time.monotonic() + 120
    workers = set()
    while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the tokenizer workers never started"
    time.sleep(0.5)                                  # rows are being written
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (-signal.SIGKILL if signum == signal.SIGKILL else 143), err
    deadline = time.monotonic() + 10
    while any(map(durable.process_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(durable.process_alive, workers)), "orphaned tokenizer workers"
    assert list(tmp.iterdir()) == []

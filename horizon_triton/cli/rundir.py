"""The CLI's output directory: locked while a run uses it, refused when it holds another run or the run's own
inputs, resumed from its checkpoints, its metrics continued.

    OUT/checkpoints/step-N/   training checkpoints (--save-every, --save-every-minutes, and on SIGINT/SIGTERM)
    OUT/metrics.jsonl         one line per step and evaluation, continued by a resumed run
    OUT/config.json, model*.safetensors, tokenizer, generation_config.json: the final model, swapped in whole
    OUT/.horizon-triton-run   the entries of OUT that runs wrote: all that --overwrite may remove

A resumed run is the same run: its options are checked against those the checkpoint recorded, its data file and
model directory against their content fingerprints (``fingerprints``), the model against the checkpoint's
architecture, and the loader skips the batches the checkpoint had consumed, so the data order and every number
continue exactly as in an uninterrupted run.

The lock (``locked``) is an flock on ``.NAME.lock`` beside OUT (inside OUT, ``.horizon-triton.lock``, when OUT
is a mount point): the kernel releases it when its process ends, however it ends, so a killed run never leaves
a stale lock behind.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from ..devices import distributed
from ..state import durable, training_state

CHECKPOINTS = "checkpoints"
REFERENCE = "reference"          # OUT/reference/{train,eval}.ref: DPO's reference log-probs, kept for --resume
RUN_MARKER = ".horizon-triton-run"
LOCK_INSIDE = ".horizon-triton.lock"
# what a run writes into OUT besides its final model's files (the marker lists those too, once saved)
RUN_ENTRIES = (CHECKPOINTS, REFERENCE, "metrics.jsonl", "metrics.png", "tensorboard", RUN_MARKER)
FINGERPRINT_BYTES = 1 << 20      # a model file's fingerprint hashes this many bytes at each end
# the options that define a run (its data order and its numbers); a resumed run must repeat them
RUN_OPTIONS = ("model", "data", "steps", "epochs", "batch_size", "lr", "seq_len", "grad_accum", "warmup", "cosine",
               "seed", "dtype", "format", "eval_problems", "eval_split", "train_on", "too_long", "objective",
               "dpo_beta", "dpo_label_smoothing", "dpo_loss", "lora_rank", "lora_alpha", "lora_targets",
               "lora_target_parameters", "world_size")
_DEFAULTS = {"world_size": 1}       # what a checkpoint written before the option existed ran with
_PATH_OPTIONS = ("model", "data")


def run_options(args) -> dict:
    options = {name: getattr(args, name) for name in RUN_OPTIONS if hasattr(args, name)}
    for name in _PATH_OPTIONS:
        if options.get(name) is not None:
            options[name] = str(Path(options[name]).resolve())
    return options


def _flag(name: str) -> str:
    return "data-parallel ranks" if name == "world_size" else "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------------------------------
# the directory: lock, inputs, what a run wrote
# ------------------------------------------------------------------------------------------------------------
def lock_path(out: Path) -> Path:
    """Beside OUT, which a save swaps out whole (a lock inside would go with it); inside a mount point, which is
    never swapped (and whose parent may not be writable)."""
    return out / LOCK_INSIDE if durable.is_mount_point(out) else out.parent / f".{out.name}.lock"


@contextmanager
def locked(out: Path):
    """An exclusive lock on --out for the block: a second run on the same --out (a second --resume, an
    --overwrite during a live run) is refused, naming the process that holds it. Data parallel: rank 0 holds
    it for the job."""
    if not distributed.is_main_process():
        yield
        return
    out = Path(out).absolute()
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise ValueError(f"--out {out} is in use by another run ({holder}): wait for it to end, or choose "
                             "another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)                 # releases the lock


def check_inputs(out: Path, inputs: dict) -> None:
    """Refuses an --out that contains, or is inside, a path the run reads (``inputs``: flag -> path): the final
    save and --overwrite replace its entries."""
    out = Path(out).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        path = Path(path).resolve()
        if path == out or path.is_relative_to(out):
            relation = "is" if path == out else "contains"
            raise ValueError(f"--out {out} {relation} {flag} {path}: the run's output directory must not hold what "
                             "the run reads (its final save and --overwrite replace entries there); choose another "
                             "--out")
        if out.is_relative_to(path):
            raise ValueError(f"--out {out} is inside {flag} {path}: the run's output directory must not be inside "
                             "what the run reads; choose another --out")


def _entries(out: Path) -> list[str]:
    """OUT's entries, without the lock and the saving machinery's temporaries."""
    return sorted(e.name for e in out.iterdir() if e.name != LOCK_INSIDE and not durable.is_internal(e.name))


def mark_run(directory: Path, names=()) -> None:
    """Writes the run marker into ``directory`` (OUT, or the final model's directory before its swap): the
    entries runs wrote there, all that --overwrite may remove."""
    durable.write_file(directory / RUN_MARKER, json.dumps({"written": sorted({*RUN_ENTRIES, *names})}).encode())


def _clear_previous_run(out: Path) -> None:
    """--overwrite: removes what earlier runs wrote into OUT, refusing if OUT holds anything else."""
    marker = out / RUN_MARKER
    ours = set(json.loads(marker.read_text())["written"]) if marker.is_file() else set()
    foreign = [name for name in _entries(out) if name not in ours]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"--out {out} holds entries no horizon-triton run wrote ({shown}): --overwrite only "
                         "removes a previous run's files; move them away or choose another --out")
    durable.discard_entries(out, [name for name in _entries(out) if name != RUN_MARKER] + [RUN_MARKER])


def _resume_point(args, out: Path) -> Path | None:
    """The checkpoint --resume names (default: the newest in OUT/checkpoints), or None for a fresh run, after
    refusing (or, with --overwrite, clearing) an --out that holds something else."""
    if args.resume is not None:
        return training_state.find(Path(args.resume) if args.resume else out / CHECKPOINTS)
    if not distributed.is_main_process():     # data parallel: rank 0 alone checks and clears --out
        return None
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.is_dir() and _entries(out):
        if not args.overwrite:
            raise ValueError(f"--out {out} exists and is not empty: pass --resume to continue the run saved there, "
                             "--overwrite to replace it, or another --out")
        _clear_previous_run(out)
    out.mkdir(parents=True, exist_ok=True)
    mark_run(out)
    return None


# ------------------------------------------------------------------------------------------------------------
# fingerprints of the inputs: a resumed run reads what the run started with
# ------------------------------------------------------------------------------------------------------------
def _hash_file(path: Path, ends: int | None = None) -> str:
    """sha256 of the whole file, or of its first and last ``ends`` bytes with its size."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if ends is None or size <= 2 * ends:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        else:
            digest.update(f.read(ends))
            f.seek(size - ends)
            digest.update(f.read(ends))
    return f"{size}:{digest.hexdigest()[:32]}"


def fingerprints(args) -> dict:
    """Content fingerprints of what a run reads, compared by --resume: --data, the whole file's sha256 (it is
    read whole anyway); --model, each of its files (config, tokenizer; and the weights for a LoRA run, whose
    frozen base is reloaded from them) by size and the sha256 of its first and last MiB: the safetensors header
    (every tensor's name, shape, offset) and the data at both ends, read in milliseconds from a base of any
    size. A copy of the same files fingerprints the same (no paths, no times)."""
    found = {}
    if getattr(args, "data", None):
        found["--data"] = {Path(args.data).name: _hash_file(Path(args.data))}
    if getattr(args, "model", None):
        weights = getattr(args, "lora_rank", None) is not None
        found["--model"] = {f.name: _hash_file(f, FINGERPRINT_BYTES) for f in sorted(Path(args.model).iterdir())
                            if f.is_file() and not f.name.startswith(".")
                            and (weights or not f.name.endswith(".safetensors"))}
    return found


def _changed_inputs(saved: dict, current: dict) -> list[str]:
    changed = []
    for flag, files in saved.items():
        now = current.get(flag, {})
        names = sorted(name for name in set(files) | set(now) if files.get(name) != now.get(name))
        if names:
            changed.append(f"{flag} changed since the run started ({', '.join(names)} differ in content)")
    return changed


def start(args, out: Path, model_cfg, train_cfg):
    """(engine, resumed): a fresh engine, or one resumed from the checkpoint --resume names. Either saves its
    checkpoints in OUT/checkpoints as --save-every / --save-every-minutes / --keep-last say."""
    from .. import Engine
    resume = _resume_point(args, out)
    train_cfg = dataclasses.replace(train_cfg, checkpoint_dir=str(out / CHECKPOINTS), save_every_steps=args.save_every,
                                    save_every_minutes=args.save_every_minutes, keep_last=args.keep_last)
    options, inputs = run_options(args), fingerprints(args)
    if resume is None:
        engine = Engine(model_cfg, train_cfg)
        engine.extra_state["cli"] = options
        engine.extra_state["inputs"] = inputs
        return engine, False
    _, state = training_state.read(resume)
    saved = state.get("extra", {}).get("cli")
    if saved is None:
        raise ValueError(f"--resume {resume}: this checkpoint was not written by horizon-triton train")
    changed = [f"{_flag(k)} {options.get(k)!r} (the checkpoint's run: {saved.get(k, _DEFAULTS.get(k))!r})"
               for k in RUN_OPTIONS if options.get(k, _DEFAULTS.get(k)) != saved.get(k, _DEFAULTS.get(k))]
    if changed:
        raise ValueError(f"--resume {resume}: the run was started with other options: {'; '.join(changed)}. "
                         "Resume with the same options")
    changed = _changed_inputs(state.get("extra", {}).get("inputs", {}), inputs)   # none saved: not compared
    if changed:
        raise ValueError(f"--resume {resume}: {'; '.join(changed)}. Resume with the files the run started with, "
                         "or start it again with --overwrite")
    differences = training_state.config_differences(training_state.model_config(state), model_cfg)
    if differences:
        raise ValueError(f"--resume {resume}: the checkpoint is of another model: {'; '.join(differences)}")
    return Engine.from_checkpoint(resume, train_cfg), True


def rest(loader, engine):
    """The loader without the batches the resumed engine had already consumed."""
    return itertools.islice(loader, engine.micro_batches, None) if engine.micro_batches else loader


def continue_metrics(path: Path, step: int) -> None:
    """Keeps the lines of metrics.jsonl up to ``step`` (a killed run may have logged steps after its last
    checkpoint, and its last line may be cut short); rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("step", 0) <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    durable.write_file(tmp, "".join(kept).encode())
    os.replace(tmp, path)
    durable.fsync_dir(path.parent)

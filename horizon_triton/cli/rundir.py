"""The CLI's output directory: refused when it holds another run, resumed from its checkpoints, its metrics
continued.

    OUT/checkpoints/step-N/   training checkpoints (--save-every, --save-every-minutes, and on SIGINT/SIGTERM)
    OUT/metrics.jsonl         one line per step and evaluation, continued by a resumed run
    OUT/config.json, model*.safetensors, tokenizer, generation_config.json: the final model, swapped in whole

A resumed run is the same run: its options are checked against those the checkpoint recorded, the model against
the checkpoint's architecture, and the loader skips the batches the checkpoint had consumed, so the data order
and every number continue exactly as in an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from pathlib import Path

from ..devices import distributed
from ..state import durable, training_state

CHECKPOINTS = "checkpoints"
# the options that define a run (its data order and its numbers); a resumed run must repeat them
RUN_OPTIONS = ("model", "data", "steps", "epochs", "batch_size", "lr", "seq_len", "grad_accum", "warmup", "cosine",
               "seed", "dtype", "format", "eval_problems", "eval_split", "train_on", "too_long", "objective",
               "dpo_beta", "dpo_label_smoothing", "dpo_loss", "lora_rank", "lora_alpha", "lora_targets",
               "world_size")
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


def _resume_point(args, out: Path) -> Path | None:
    """The checkpoint --resume names (default: the newest in OUT/checkpoints), or None for a fresh run, after
    refusing (or, with --overwrite, clearing) an --out that holds something else."""
    if args.resume is not None:
        return training_state.find(Path(args.resume) if args.resume else out / CHECKPOINTS)
    if not distributed.is_main_process():     # data parallel: rank 0 alone checks and clears --out
        return None
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"--out {out} exists and is not empty: pass --resume to continue the run saved there, "
                             "--overwrite to replace it, or another --out")
        durable.discard_dir(out)
    elif out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    return None


def start(args, out: Path, model_cfg, train_cfg):
    """(engine, resumed): a fresh engine, or one resumed from the checkpoint --resume names. Either saves its
    checkpoints in OUT/checkpoints as --save-every / --save-every-minutes / --keep-last say."""
    from .. import Engine
    resume = _resume_point(args, out)
    train_cfg = dataclasses.replace(train_cfg, checkpoint_dir=str(out / CHECKPOINTS), save_every_steps=args.save_every,
                                    save_every_minutes=args.save_every_minutes, keep_last=args.keep_last)
    options = run_options(args)
    if resume is None:
        engine = Engine(model_cfg, train_cfg)
        engine.extra_state["cli"] = options
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

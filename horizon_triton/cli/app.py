"""The command line: ``horizon-triton train`` and ``horizon-triton data`` and ``horizon-triton plan``.

    horizon-triton train                                   the demo: a fresh "demo" model learns addition on CPU
    horizon-triton train --model DIR --data FILE.jsonl --out DIR   fine-tunes a Hugging Face checkpoint
    horizon-triton data --model DIR --data FILE.jsonl --show 3     how the records tokenize, what is trained
    horizon-triton plan --model DIR|config.json [--tokens-per-step N] [--gpu h100] [--host-ram 1.5TB]
                                                           memory and speed of a run, from the config alone

Both show a progress bar on a terminal (one plain line a step otherwise) and write metrics.jsonl into --out:
one {"kind": "train", ...} line per optimizer step (the engine's history entry) and one {"kind": "eval", ...}
line per evaluation (the demo's held-out exact match; the fine-tune's eval loss). The fine-tune saves the model
with engine.save_pretrained and plots metrics.png beside metrics.jsonl. ``train --config run.yaml`` reads options
from a YAML file (the flags' names, with - or _); flags given on the command line override it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .. import data
from ..devices import distributed
from ..devices.device import device_kind
from ..state import durable, interrupts
from . import rundir

# The demo's defaults, measured on 2 CPU cores shared with other jobs (128 held-out problems, seed 0):
# - format "pad" (fixed width, "007+045=0052"): held-out exact match 59% at step 200, 96% at step 400; the human
#   format ("7+45=52") stayed at 2%, reversed answers at 8%, after 400 steps;
# - float32: a step took as long as a bfloat16 one on CPU, and learned faster (87-91% vs 30% at step 300);
# - one thread: the ops are tiny ([64 x 13 tokens, hidden 128]); with the cores shared, two threads made the
#   steps 3-6x slower (they wait at barriers for a core).
DEMO = dict(format="pad", steps=400, batch_size=64, lr=3e-3, warmup=30, weight_decay=0.1, eval_every=50,
            dtype="float32", threads=1)
FINETUNE = dict(lr=1e-5, batch_size=8, seq_len=512, warmup=0, epochs=3)
TINY_RUN_STEPS = 10          # fewer optimizer steps than this get a warning in the plan line
SMALL_FILE_BYTES = 8 << 20   # data files below this are tokenized in this process (workers cost a start-up)
DEMO_ONLY = ("format", "eval_problems")
FINETUNE_ONLY = ("data", "seq_len", "epochs", "eval_data", "eval_split", "train_on", "too_long", "workers",
                 "report_to", "objective", "dpo_beta", "dpo_label_smoothing", "dpo_loss")
# a final save that fails (a full disk, an unwritable --out) with no training checkpoint written either is retried
# this often, for at most this long, the trained state kept in memory meanwhile
SAVE_RETRY_S = float(os.environ.get("HORIZON_TRITON_SAVE_RETRY_S", 60))
SAVE_WAIT_S = float(os.environ.get("HORIZON_TRITON_SAVE_WAIT_S", 3600))


# ------------------------------------------------------------------------------------------------------------
# progress and metrics
# ------------------------------------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


class Progress:
    """On a terminal, a progress bar with the step, its ETA and the latest loss (tqdm); otherwise one plain line a
    step. ``note`` prints a line of its own (an evaluation) without clobbering the bar."""

    def __init__(self, total: int | None, stream=None):
        self.total = total
        if not distributed.is_main_process():      # data parallel: rank 0 reports for every rank
            stream = open(os.devnull, "w")
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self._bar = None

    def _line(self, entry: dict) -> str:
        dpo = (f"accuracy {entry['rewards/accuracies']:.2f}  margin {entry['rewards/margins']:.3f}  "
               if "rewards/accuracies" in entry else "")
        return (f"loss {entry['loss']:.4f}  {dpo}{entry['tokens_per_s']:,.0f} tok/s  "
                f"rss {_mib(entry['host_rss_peak_bytes'])}  device peak {_mib(entry['device_peak_bytes'])}")

    def step(self, entry: dict) -> None:
        if self.tty:
            if self._bar is None:
                from tqdm import tqdm
                self._bar = tqdm(total=self.total, file=self.stream, unit="step", dynamic_ncols=True,
                                 initial=entry["step"] - 1)
            self._bar.set_postfix_str(self._line(entry), refresh=False)
            self._bar.update(entry["step"] - self._bar.n)
            return
        total = f"/{self.total}" if self.total else ""
        self.stream.write(f"step {entry['step']}{total}  {self._line(entry)}\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Metrics:
    """metrics.jsonl in the output directory, one JSON object a line, flushed as it goes (so it can be followed
    with tail -f). engine.save_pretrained swaps in a new directory (holding a copy of this file), so ``save``
    reopens it. A resumed run (``resumed_step``) continues the file from its checkpoint's step. Data parallel:
    rank 0 alone writes it (the history is the global figures on every rank)."""

    def __init__(self, out_dir: Path, resumed_step: int | None = None):
        self.out_dir = out_dir
        self.path = out_dir / "metrics.jsonl"
        self._file = None
        if not distributed.is_main_process():
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None:
            rundir.continue_metrics(self.path, resumed_step)
        self._file = self.path.open("w" if resumed_step is None else "a", encoding="utf-8")

    def write(self, kind: str, entry: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"kind": kind, **entry}) + "\n")
        self._file.flush()

    def save(self, engine, tokenizer=None, source=None, merge: bool = False) -> None:
        """The final model into out_dir: weights, config, the tokenizer and generation_config.json of the
        ``source`` model, and this file, assembled beside out_dir and swapped in as one unit (the run's
        checkpoints move into the new directory). A LoRA run saves its adapters (peft's format), or with
        ``merge`` the base with the adapters merged in. Every rank calls it; rank 0 writes."""
        if self._file is not None:
            self._file.close()

        def add_files(tmp: Path) -> None:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if source is not None and (Path(source) / "generation_config.json").is_file():
                shutil.copy2(Path(source) / "generation_config.json", tmp / "generation_config.json")
            shutil.copy2(self.path, tmp / self.path.name)
            rundir.mark_run(tmp, [e.name for e in tmp.iterdir()])
        try:
            engine.save_pretrained(self.out_dir, add_files=add_files, merge=merge)
        finally:
            if self._file is not None:
                self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# ------------------------------------------------------------------------------------------------------------
# the two jobs
# ------------------------------------------------------------------------------------------------------------
def run_demo(args) -> dict:
    """A fresh "demo" model learns 1-3 digit addition; held-out exact match is printed as it rises."""
    import torch

    from .. import preset
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or DEMO["threads"])
    form, eval_every = args.format or DEMO["format"], args.eval_every or DEMO["eval_every"]
    task = data.AdditionTask(min_digits=1, max_digits=3, num_heldout=args.eval_problems or 256, seed=args.seed,
                             pad="pad" in form, reverse="reverse" in form)
    model_cfg = preset("demo")
    if model_cfg.vocab_size < task.tokenizer.vocab_size:
        raise ValueError(f"the demo preset's vocab_size {model_cfg.vocab_size} is below the addition "
                         f"vocabulary's {task.tokenizer.vocab_size}")
    steps = args.steps or DEMO["steps"]
    train_cfg = _train_config(lr=DEMO["lr"] if args.lr is None else args.lr, weight_decay=DEMO["weight_decay"],
                            lr_schedule="cosine",
                            warmup_steps=DEMO["warmup"], device=args.device or "cpu", seed=args.seed,
                            compute_dtype=args.dtype or DEMO["dtype"], grad_accum_steps=args.grad_accum,
                            **_lora_options(args))
    if args.out is None:          # the demo's default directory holds only earlier demos: rerunning replaces it
        args.overwrite = True
    out = Path(args.out or "runs/demo")
    rundir.check_inputs(out, {"--config": args.config})
    with rundir.locked(out):
        return _demo(args, task, model_cfg, train_cfg, steps, eval_every, out)


def _demo(args, task, model_cfg, train_cfg, steps: int, eval_every: int, out: Path) -> dict:
    engine, resumed = rundir.start(args, out, model_cfg, train_cfg)
    metrics, progress = Metrics(out, engine.step if resumed else None), Progress(steps)
    batch_size = args.batch_size or DEMO["batch_size"]
    world = engine.dist.world if engine.dist is not None else 1
    progress.note(f"demo: {model_cfg.num_parameters():,} parameter model learns {task.min_digits}-{task.max_digits} "
                  f"digit addition ({steps} steps of {batch_size * args.grad_accum * world} problems, lr {train_cfg.lr}, "
                  f"{train_cfg.compute_dtype} on {train_cfg.device}); exact match on {len(task.heldout)} "
                  f"held-out problems every {eval_every} steps")
    start = time.perf_counter()
    curve = []

    def evaluate(step: int, final: bool = False) -> None:
        accuracy = data.exact_match(engine.logits, task)
        if final:                   # a signal during it: a checkpoint, then the stop, before the line is written
            engine.stop_if_signalled()
        elapsed = time.perf_counter() - start
        curve.append((step, accuracy, elapsed))
        metrics.write("eval", {"step": step, "exact_match": accuracy, "problems": len(task.heldout),
                               "elapsed_s": elapsed})
        progress.note(f"eval step {step}: held-out exact match {accuracy:6.1%}  ({elapsed:.0f} s)")

    def on_step(entry: dict) -> None:
        metrics.write("train", entry)
        progress.step(entry)
        if entry["step"] % eval_every == 0 and entry["step"] != steps:
            evaluate(entry["step"])

    try:
        if not resumed:
            evaluate(0)
        with interrupts.deferred_signals():     # from the first step to the saved model: see _save_final
            if engine.step < steps:     # data parallel: rank r trains on every world_size-th batch, from the r-th
                batches = distributed.shard_loader(task.batches(batch_size, seed=args.seed), engine.dist)
                engine.fit(rundir.rest(batches, engine), max_steps=steps - engine.step, callback=on_step)
            progress.close()
            _save_final(engine, lambda: metrics.save(engine, merge=args.merge), progress)
            evaluate(steps, final=True)
        problems = task.heldout[:5]
        for problem, answer in zip(problems, data.greedy_answers(engine.logits, task, problems)):
            ok = answer == task.target(problem)
            verdict = "ok" if ok else f"expected {problem.answer}"
            progress.note(f"  {task.show(problem)}{task.read_answer(answer)}  {verdict}")
    finally:
        progress.close()
        metrics.close()
        engine.close()
    progress.note(f"done in {time.perf_counter() - start:.0f} s; model and metrics.jsonl in {out}")
    return {"curve": curve}


def _pad_id(tokenizer) -> int:
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def _workers(args, path) -> int:
    if args.workers is not None:
        return args.workers
    small = Path(path).is_file() and Path(path).stat().st_size < SMALL_FILE_BYTES
    return 0 if small else min(8, os.cpu_count() or 1)


def _prepare(args, tokenizer, seq_len: int, path, out_dir, eval_fraction: float = 0.0, keep_examples: int = 0):
    return data.prepare(path, tokenizer, seq_len, _pad_id(tokenizer), out_dir, train_on=args.train_on or "assistant",
                        too_long=args.too_long or "drop", workers=_workers(args, path), eval_fraction=eval_fraction,
                        seed=args.seed, keep_examples=keep_examples, preference=args.objective == "dpo")


def _reference_pass(engine, rows, name: str, out: Path, resumed: bool, batch_size: int, progress) -> None:
    """DPO: the reference log-probs of every row from the starting weights, once, into OUT/reference/NAME.ref
    (a forward-only streamed pass, with a progress bar on a terminal); a resumed run reuses that file."""
    from ..objectives import preference
    path = out / rundir.REFERENCE / f"{name}.ref"
    if resumed:
        if not path.is_file():
            raise ValueError(f"--resume: {path} (the reference log-probs this DPO run computed from its starting "
                             "weights) is missing; start the run again with --overwrite")
        rows.attach_reference(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = None
    if progress.tty:
        from tqdm import tqdm
        bar = tqdm(total=len(rows), file=progress.stream, unit="row", desc=f"reference {name}", dynamic_ncols=True)
    preference.add_reference(engine, rows, batch_size, path,
                             on_batch=(lambda done: bar.update(done - bar.n)) if bar else None)
    if bar is not None:
        bar.close()
    progress.note(f"reference log-probs of {len(rows):,} {name} rows in {time.perf_counter() - start:.1f} s")


def _seq_len(args, model_cfg) -> int:
    if args.seq_len and args.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} is above the model's max_position_embeddings "
                         f"{model_cfg.max_position_embeddings}")
    return args.seq_len or min(FINETUNE["seq_len"], model_cfg.max_position_embeddings)


def run_finetune(args) -> dict:
    """Fine-tunes the Hugging Face checkpoint in --model on --data; the result goes to --out."""
    from .. import ModelConfig
    if not args.data:
        raise ValueError("--model needs --data FILE.jsonl")
    if not args.out:
        raise ValueError("--model needs --out DIR for the fine-tuned checkpoint")
    rundir.check_inputs(Path(args.out), {"--model": args.model, "--data": args.data, "--eval-data": args.eval_data,
                                         "--config": args.config})
    if args.eval_data and args.eval_split:
        raise ValueError("--eval-data and --eval-split both choose the eval set; give one of them")
    if args.objective == "dpo" and args.train_on:
        raise ValueError("--train-on does not apply to --objective dpo: its pairs train their responses only")
    if args.eval_every and not (args.eval_data or args.eval_split):
        raise ValueError("--eval-every needs an eval set: --eval-data FILE or --eval-split FRACTION")
    model_cfg = ModelConfig.from_pretrained(args.model)       # checks the directory before the data is read
    with rundir.locked(Path(args.out)):                       # before the data is read: a second run stops at once
        return _finetune(args, model_cfg)


def _finetune(args, model_cfg) -> dict:
    tokenizer = data.load_tokenizer(args.model)
    seq_len = _seq_len(args, model_cfg)
    tensorboard = None
    if args.report_to == "tensorboard":
        from .reporting import TensorBoard
        tensorboard = TensorBoard                             # checks the package is there before any work
    # every line is checked, tokenized and packed into row files before training starts: unnamed temporary
    # files, which vanish with this process however it ends
    prepared = _prepare(args, tokenizer, seq_len, args.data, data.TEMPORARY, eval_fraction=args.eval_split or 0.0)
    eval_rows, eval_stats = prepared.eval, prepared.stats.get("eval")
    if args.eval_data:
        held = _prepare(args, tokenizer, seq_len, args.eval_data, data.TEMPORARY)
        eval_rows, eval_stats = held.train, held.stats["train"]
    try:
        top = max(s.max_id for s in prepared.stats.values())
        if top >= model_cfg.vocab_size:
            raise ValueError(f"the tokenizer in {args.model} gives token id {top}, but the model's vocab_size is "
                             f"{model_cfg.vocab_size}: the tokenizer does not belong to this model")
        batch_size = args.batch_size or FINETUNE["batch_size"]
        epochs = args.epochs or FINETUNE["epochs"]
        # data parallel: one loader's batches dealt out, rank r taking every world-th from the r-th; a step is
        # grad_accum of them on every rank
        ctx = distributed.context(device_kind(args.device or "auto"))
        world = ctx.world if ctx is not None else 1
        if args.steps:
            loader = data.RowLoader(prepared.train, batch_size, args.steps, args.grad_accum * world, seed=args.seed)
        else:
            loader = data.RowLoader(prepared.train, batch_size, grad_accum=args.grad_accum, seed=args.seed,
                                    epochs=epochs)
        loader = distributed.shard_loader(loader, ctx)
        steps = math.ceil(len(loader) / args.grad_accum)
        per_epoch = data.steps_per_epoch(len(prepared.train), batch_size, args.grad_accum * world)
        eval_loader = (distributed.shard_loader(data.RowLoader(eval_rows, batch_size, epochs=1, shuffle=False), ctx,
                                                drop_remainder=False)
                       if eval_rows is not None else None)
        train_cfg = _train_config(lr=FINETUNE["lr"] if args.lr is None else args.lr, warmup_steps=args.warmup,
                                seed=args.seed, grad_accum_steps=args.grad_accum, device=args.device or "auto",
                                compute_dtype=args.dtype or "bfloat16",
                                lr_schedule="cosine" if args.cosine else "constant",
                                objective=args.objective or "sft",
                                **{k: getattr(args, k) for k in ("dpo_beta", "dpo_label_smoothing", "dpo_loss")
                                   if getattr(args, k) is not None},
                                **_lora_options(args))
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        out = Path(args.out)
        engine, resumed = rundir.start(args, out, model_cfg, train_cfg)
        metrics, progress = Metrics(out, engine.step if resumed else None), Progress(steps)
        board = tensorboard(out / "tensorboard") if tensorboard and distributed.is_main_process() else None
        how_long = (f"{steps} steps (--steps; an epoch is {per_epoch})" if args.steps else
                    f"{steps} steps = {epochs} epochs of {per_epoch}")
        progress.note(f"fine-tune {args.model}: {model_cfg.num_parameters():,} parameters, lr {train_cfg.lr}, "
                      f"{train_cfg.compute_dtype} on {engine.device.type}\n"
                      f"  train data: {prepared.stats['train'].summary(seq_len, args.too_long or 'drop')}\n"
                      + (f"  eval data: {eval_stats.summary(seq_len, args.too_long or 'drop')}\n" if eval_stats else "")
                      + f"  {how_long}, {batch_size}x{args.grad_accum} rows a step")
        if steps < TINY_RUN_STEPS:
            progress.note(f"warning: only {steps} optimizer steps; the model will hardly change (more data, more "
                          "--epochs or a smaller --batch-size make more steps)")
        dpo = train_cfg.objective == "dpo"
        if dpo:       # before any step: the reference is the starting weights
            for name, rows in (("train", prepared.train), ("eval", eval_rows)):
                if rows is not None:
                    _reference_pass(engine, rows, name, out, resumed, batch_size, progress)
        start = time.perf_counter()

        def evaluate(step: int, final: bool = False) -> None:
            # the final one stops at the next batch on a signal, and is then discarded (see _save_final)
            batches = interrupts.until_signal(eval_loader) if final else eval_loader
            if dpo:           # the DPO loss and TRL's metrics on the held-out pairs
                scores = engine.evaluate_preferences(batches)
                loss, extra = scores.pop("loss"), {f"eval_{k}": v for k, v in scores.items()}
            else:
                loss, extra = engine.evaluate(batches), {}
            if final:
                engine.stop_if_signalled()
            metrics.write("eval", {"step": step, "eval_loss": loss, "rows": len(eval_rows),
                                   "elapsed_s": time.perf_counter() - start, **extra})
            if board:
                board.eval(step, loss)
            progress.note(f"eval step {step}: eval loss {loss:.4f}")

        def on_step(entry: dict) -> None:
            metrics.write("train", entry)
            if board:
                board.train(entry)
            progress.step(entry)
            if eval_loader and args.eval_every and entry["step"] % args.eval_every == 0 and entry["step"] != steps:
                evaluate(entry["step"])

        try:
            with interrupts.deferred_signals():     # from the first step to the saved model: see _save_final
                history = engine.fit(rundir.rest(loader, engine), max_steps=steps - engine.step,
                                     callback=on_step) if engine.step < steps else []
                progress.close()
                _save_final(engine, lambda: metrics.save(engine, tokenizer, source=args.model, merge=args.merge),
                            progress)
                if eval_loader:
                    evaluate(steps, final=True)
            if board:
                board.close()
        finally:
            progress.close()
            metrics.close()
            engine.close()
        _plot(out, progress)
        final = f"final loss {history[-1]['loss']:.4f}; " if history else ""
        progress.note(f"done in {time.perf_counter() - start:.0f} s; {final}model and metrics.jsonl in {out}")
        return {"history": history}
    finally:
        prepared.close()
        if args.eval_data:
            held.close()


class ModelNotSaved(Exception):
    """The final save failed; the message says where the trained state is, if anywhere."""


def _save_final(engine, save, progress) -> None:
    """The end of a run, called inside interrupts.deferred_signals() after fit: ``save()`` writes the model
    first, so that a signal (a scheduler's time limit) during the final evaluation that follows costs only the
    evaluation (it stops at its next batch, a training checkpoint is written, the run stops with 130 or 143, and
    --resume evaluates and saves again). A save that fails with an OS error (a full disk, a read-only or busy
    --out) keeps the trained state: a training checkpoint is written instead (ModelNotSaved says where, for
    --resume), or where that fails too, both are retried every SAVE_RETRY_S seconds, saying what is full, for
    at most SAVE_WAIT_S (a SIGINT or SIGTERM gives up). Data parallel: the error stops every rank."""
    deadline = time.monotonic() + SAVE_WAIT_S
    while True:
        try:
            save()
            return
        except OSError as e:
            if engine.dist is not None:
                raise
            failed = durable.describe(e)
        progress.note(f"error: the model could not be saved: {failed}")
        step, checkpoint = engine.last_checkpoint
        if step != engine.step and engine.train_cfg.checkpoint_dir is not None:
            try:
                checkpoint = engine.save_checkpoint(engine.train_cfg.checkpoint_dir,
                                                    keep_last=engine.train_cfg.keep_last)
            except OSError as e:
                progress.note(f"error: nor could the training state be saved: {durable.describe(e)}")
                checkpoint = None
        elif step != engine.step:
            checkpoint = None
        if checkpoint is not None:
            raise ModelNotSaved(f"the model could not be saved ({failed}); the trained state of step {engine.step} "
                                f"is in {checkpoint}: make room or fix the path, then run the same command with "
                                "--resume to write the model")
        if interrupts.received() is not None or time.monotonic() >= deadline:
            raise ModelNotSaved(f"the model could not be saved ({failed}), nor the training state: the run is lost")
        progress.note(f"the trained state is kept in memory: make room or fix the path; retrying every "
                      f"{SAVE_RETRY_S:g} s for {max(0.0, deadline - time.monotonic()) / 60:.0f} more minutes "
                      "(SIGINT or SIGTERM gives up)")
        until = time.monotonic() + SAVE_RETRY_S
        while time.monotonic() < until and interrupts.received() is None:
            time.sleep(min(0.5, SAVE_RETRY_S))


def run_plan(args) -> dict:
    """Prints the plan of --model on --gpu, and the deepest model of its shape that fits --host-ram and the card."""
    from ..config import PRESETS, ModelConfig, preset
    from ..devices.device import host_memory_info
    from ..planning.plan import format_plan, largest_model, parse_bytes, plan
    path = Path(args.model)
    if path.is_file():
        if path.name != "config.json":
            raise ValueError(f"--model {args.model}: give a model directory or its config.json")
        path = path.parent
    model_cfg = preset(args.model) if args.model in PRESETS and not path.exists() else ModelConfig.from_pretrained(path)
    train_cfg = _train_config(compute_dtype=args.dtype, grad_accum_steps=args.grad_accum, **_lora_options(args))
    host_ram = parse_bytes(args.host_ram) if args.host_ram else host_memory_info()[1]
    options = dict(tokens_per_step=args.tokens_per_step, hardware=args.gpu, seq_len=args.seq_len)
    result = plan(model_cfg, train_cfg, host_memory_bytes=host_ram, **options)
    largest = largest_model(model_cfg, train_cfg, host_memory_bytes=host_ram, **options)
    print(format_plan(result, largest))
    if largest is None:
        print(f"  not even one layer of this shape fits {args.gpu} with {host_ram / 1e12:.2f} TB of host memory")
    return {"plan": result, "largest": largest}


# TrainConfig's settings the command line sets, by the flag that sets them (its errors name the flag)
FLAGS = {"lr": "--lr", "warmup_steps": "--warmup", "grad_accum_steps": "--grad-accum", "dpo_beta": "--dpo-beta",
         "dpo_label_smoothing": "--dpo-label-smoothing", "dpo_loss": "--dpo-loss", "lora_rank": "--lora-rank",
         "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets", "compute_dtype": "--dtype",
         "device": "--device"}


def _train_config(**settings):
    """TrainConfig(**settings), its refusals naming the command line's flags rather than its fields."""
    from .. import TrainConfig
    try:
        return TrainConfig(**settings)
    except ValueError as e:
        message = str(e)
        field = re.match(r"\w+", message)
        if field is not None and field[0] in FLAGS:
            message = FLAGS[field[0]] + message[field.end():]
        raise ValueError(message) from None


def _lora_options(args) -> dict:
    """TrainConfig's LoRA settings from --lora-rank, --lora-alpha, --lora-targets (TrainConfig checks them)."""
    if args.lora_rank is None:
        if getattr(args, "merge", False) or args.lora_alpha is not None or args.lora_targets is not None:
            raise ValueError("--lora-alpha, --lora-targets and --merge need --lora-rank R (a LoRA run)")
        return {}
    options = {"lora_rank": args.lora_rank}
    if args.lora_alpha is not None:
        options["lora_alpha"] = args.lora_alpha
    if args.lora_targets is not None:
        options["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    return options


def _add_lora_options(parser, merge: bool) -> None:
    group = parser.add_argument_group("LoRA", "adapters on a frozen base (peft's LoraConfig names and defaults)")
    group.add_argument("--lora-rank", type=_positive, metavar="R", help="train rank-R LoRA adapters, the base frozen "
                                                                         "(default: full fine-tune)")
    group.add_argument("--lora-alpha", type=float, help="adapter scaling alpha / R (default 8, as peft)")
    group.add_argument("--lora-targets", metavar="NAMES", help="comma-separated projections among q_proj, k_proj, "
                       "v_proj, o_proj, gate_proj, up_proj, down_proj (default: q_proj,v_proj)")
    if merge:
        group.add_argument("--merge", action="store_true", help="save the base with the adapters merged in (a "
                           "full model for transformers) instead of the adapters in peft's format")


def _plot(out: Path, progress: Progress) -> None:
    from .reporting import plot_metrics
    if not distributed.is_main_process():
        return
    try:
        progress.note(f"plot: {plot_metrics(out / 'metrics.jsonl', out / 'metrics.png')}")
    except ImportError as e:
        progress.note(f"no plot: {e}")


def run_data(args) -> dict:
    """Shows how --data tokenizes with --model's tokenizer: the first --show records token by token, trained
    tokens marked, and the statistics of the whole file."""
    from .. import ModelConfig
    model_cfg = ModelConfig.from_pretrained(args.model)
    tokenizer = data.load_tokenizer(args.model)
    seq_len = _seq_len(args, model_cfg)
    prepared = _prepare(args, tokenizer, seq_len, args.data, None, keep_examples=args.show)
    if prepared.examples:
        print("trained tokens are shown \u00abbetween guillemets\u00bb")
    for number, ids, labels in prepared.examples:
        pair = isinstance(ids, list)                 # a preference pair: its chosen and its rejected
        for what, seq_ids, seq_labels in zip(("chosen", "rejected"), ids, labels) if pair else [("", ids, labels)]:
            trained = int((seq_labels != data.IGNORE_INDEX).sum())
            print(f"--- {args.data}:{number}{' ' + what if what else ''}: {len(seq_ids)} tokens, {trained} trained")
            print(show_tokens(tokenizer, seq_ids, seq_labels))
    stats = prepared.stats["train"]
    print(f"{args.data}: {stats.summary(seq_len, args.too_long or 'drop')}")
    return {"stats": stats, "examples": prepared.examples}


def show_tokens(tokenizer, ids, labels) -> str:
    """The decoded tokens with each run of trained ones between \u00ab and \u00bb."""
    pieces, run, trained_run = [], [], None
    for token, label in zip(ids.tolist(), labels.tolist()):
        trained = label != data.IGNORE_INDEX
        if trained != trained_run and run:
            pieces.append((trained_run, run))
            run = []
        run.append(token)
        trained_run = trained
    if run:
        pieces.append((trained_run, run))
    text = ""
    for trained, run in pieces:
        piece = tokenizer.decode(run, skip_special_tokens=False)
        text += f"\u00ab{piece}\u00bb" if trained else piece
    return text


# ------------------------------------------------------------------------------------------------------------
# argument parsing
# ------------------------------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _non_negative(kind):
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
        return value
    parse.__name__ = kind.__name__           # argparse names the type in its errors
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="horizon-triton", description="Fine-tune language models larger than "
                                     "GPU memory on one GPU, or train the built-in addition demo.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the addition demo (no arguments) or fine-tune a checkpoint",
                           description="With no --model: the addition demo on CPU. With --model DIR --data "
                                       "FILE.jsonl --out DIR: fine-tune that Hugging Face checkpoint.")
    train.add_argument("--model", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    train.add_argument("--config", help="YAML file of options (the flags' names); flags given here override it")
    train.add_argument("--data", help="JSONL file, one record a line: text, prompt/response, messages (chat), Alpaca "
                                      "or ShareGPT (see README)")
    train.add_argument("--out", help="output directory (demo default: runs/demo)")
    train.add_argument("--steps", type=_positive, help=f"optimizer steps (demo: {DEMO['steps']}; fine-tune: "
                                                       "overrides --epochs)")
    train.add_argument("--epochs", type=_positive, help=f"fine-tune: passes over the data (default "
                                                        f"{FINETUNE['epochs']})")
    train.add_argument("--batch-size", type=_positive, help=f"rows a micro-batch (demo: {DEMO['batch_size']}; "
                                                            f"fine-tune: {FINETUNE['batch_size']})")
    train.add_argument("--lr", type=_non_negative(float), help=f"peak learning rate (demo: {DEMO['lr']}; fine-tune: "
                                                f"{FINETUNE['lr']})")
    train.add_argument("--seq-len", type=_positive, help="fine-tune: tokens a packed row (default: 512, at most "
                                                         "max_position_embeddings)")
    train.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches an optimizer step")
    train.add_argument("--warmup", type=_non_negative(int), default=0, help="fine-tune: linear warm-up steps")
    train.add_argument("--cosine", action="store_true", help="fine-tune: cosine decay to 0 (default: constant)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=["cpu", "cuda", "auto"], help="demo: cpu; fine-tune: auto")
    train.add_argument("--dtype", choices=["bfloat16", "float32"], help=f"compute dtype (demo: {DEMO['dtype']}; "
                                                                        "fine-tune: bfloat16)")
    train.add_argument("--eval-every", type=_positive, help=f"steps between evaluations (demo: {DEMO['eval_every']}; "
                                                            "fine-tune: only at the end)")
    train.add_argument("--eval-data", help="fine-tune: JSONL file of held-out records for the eval loss")
    train.add_argument("--eval-split", type=_fraction, help="fine-tune: hold out this fraction of --data's records "
                                                            "for the eval loss (e.g. 0.05)")
    _add_data_options(train)
    train.add_argument("--report-to", choices=["none", "tensorboard"], help="fine-tune: also write TensorBoard "
                                                                            "scalars to OUT/tensorboard")
    dpo = train.add_argument_group("preference tuning", "--objective dpo: --data holds preference pairs (see README)")
    dpo.add_argument("--dpo-beta", type=float, help="DPO's beta: how far the policy may move from the reference "
                                                    "(default 0.1)")
    dpo.add_argument("--dpo-label-smoothing", type=float, help="probability a preference is flipped (sigmoid, "
                                                               "robust; default 0)")
    dpo.add_argument("--dpo-loss", choices=["sigmoid", "robust", "hinge", "ipo"], help="default sigmoid")
    train.add_argument("--format", choices=["plain", "pad", "reverse", "pad-reverse"],
                       help="demo: how sums are written for the model (see data.AdditionTask)")
    train.add_argument("--threads", type=_positive, help=f"torch CPU threads (demo: {DEMO['threads']}; fine-tune: "
                                                         "torch's default)")
    train.add_argument("--eval-problems", type=_positive, help="demo: held-out problems (default 256)")
    _add_lora_options(train, merge=True)
    _add_checkpoint_options(train)
    parser.train_parser = train      # with_config reads its options
    show = sub.add_parser("data", help="show how a data file tokenizes and what the loss counts",
                          description="Prints how the first --show records tokenize with the model's tokenizer "
                                      "(trained tokens between \u00ab and \u00bb) and the statistics of the whole "
                                      "file: records, tokens, trained tokens, records longer than --seq-len.")
    show.add_argument("--model", required=True, help="Hugging Face model directory (its tokenizer and config)")
    show.add_argument("--data", required=True, help="JSONL file")
    show.add_argument("--show", type=int, default=3, help="records to print token by token (default 3)")
    show.add_argument("--seq-len", type=_positive, help="tokens a packed row (default: 512, at most "
                                                        "max_position_embeddings)")
    show.add_argument("--seed", type=int, default=0)
    _add_data_options(show)

    from ..planning.plan import HARDWARE
    plan = sub.add_parser("plan", help="host and device memory, bus bytes and step time of a run, from a config",
                          description="Dry-runs one training step of the model (no weights needed) and prints what "
                                      "it needs and how fast it would go, and the deepest model of the same shape "
                                      "that fits the host memory and the card.")
    plan.add_argument("--model", required=True, help="Hugging Face model directory, its config.json, or a preset")
    plan.add_argument("--tokens-per-step", type=_positive, default=32768, help="tokens an optimizer step "
                                                                                "(default: 32768)")
    plan.add_argument("--seq-len", type=_positive, help="tokens a row (default: min(tokens a micro-batch, "
                                                        "max_position_embeddings))")
    plan.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches an optimizer step")
    plan.add_argument("--gpu", choices=list(HARDWARE), default="h100", help="the machine (default: h100)")
    plan.add_argument("--host-ram", help="host memory to plan for, e.g. 1.5TB or 512GiB (default: this machine's)")
    plan.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype")
    _add_lora_options(plan, merge=False)
    return parser


def _add_checkpoint_options(train: argparse.ArgumentParser) -> None:
    group = train.add_argument_group("checkpoints", f"training state is saved in OUT/{rundir.CHECKPOINTS} (also "
                                     "when SIGINT or SIGTERM stops the run)")
    group.add_argument("--save-every", type=_positive, metavar="N", help="save a checkpoint every N steps")
    group.add_argument("--save-every-minutes", type=float, metavar="M", help="save a checkpoint every M minutes")
    group.add_argument("--keep-last", type=_positive, metavar="K", help="keep only the K newest checkpoints")
    group.add_argument("--resume", nargs="?", const="", metavar="DIR",
                       help="continue a run from a checkpoint (default: the newest in --out), with the same options")
    group.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _add_data_options(parser) -> None:
    parser.add_argument("--objective", choices=["sft", "dpo"], help="sft: records trained on their labels "
                                                                    "(default); dpo: preference pairs")
    parser.add_argument("--train-on", choices=list(data.TRAIN_ON), help="chat records: train the assistant turns "
                                                                        "(default) or every token")
    parser.add_argument("--too-long", choices=list(data.TOO_LONG), help="records longer than --seq-len: drop "
                                                                        "(default), truncate or error")
    parser.add_argument("--workers", type=int, help="tokenizer processes (default: none for files under 8 MiB, "
                                                    "else one a core, at most 8)")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1), got {value}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("horizon-triton")
    except PackageNotFoundError:
        return "(not installed)"


def with_config(argv: list[str], train: argparse.ArgumentParser) -> list[str]:
    """``train --config run.yaml ...`` -> the file's options as flags, then the command line's (later flags win,
    as argparse takes the last occurrence). Keys are the flags' names with - or _; true/false for switches."""
    if len(argv) < 1 or argv[0] != "train" or not any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    rest, path = [], None
    it = iter(argv[1:])
    for a in it:
        if a == "--config":
            path = next(it, None)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    if not path:
        raise ValueError("--config needs a YAML file")
    rest = ["--config", path, *rest]          # kept: check_inputs refuses an --out holding it
    import yaml
    if not Path(path).is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        options = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(options, dict):
        raise ValueError(f"config file {path} must be a mapping of option: value, got {type(options).__name__}")
    actions = {a.dest: a for a in train._actions if a.option_strings}
    flags = []
    for key, value in options.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest in ("help", "config"):
            known = ", ".join(sorted(d for d in actions if d not in ("help", "config")))
            raise ValueError(f"config file {path}: unknown option {key!r}; options are {known}")
        flag = actions[dest].option_strings[0]
        if actions[dest].nargs == 0:                       # a switch (store_true)
            if not isinstance(value, bool):
                raise ValueError(f"config file {path}: {key} is a switch, give true or false, not {value!r}")
            flags += [flag] if value else []
        elif value is not None:
            flags += [flag, str(value)]
    return ["train", *flags, *rest]


def _given(args, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) not in (None, False)]


def _train(args) -> None:
    if args.model:
        if _given(args, DEMO_ONLY):
            raise ValueError(f"{', '.join(_given(args, DEMO_ONLY))}: demo options, not for fine-tuning --model")
        run_finetune(args)
    else:
        if _given(args, FINETUNE_ONLY):
            raise ValueError(f"{', '.join(_given(args, FINETUNE_ONLY))}: fine-tuning options, they need "
                             "--model DIR")
        run_demo(args)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(with_config(argv, parser.train_parser))
    if args.command == "data":
        run_data(args)
    elif args.command == "plan":
        run_plan(args)
    else:
        # under torchrun: data parallel; an error on any rank, here or in the engine, ends every rank
        ctx = distributed.context(device_kind(args.device or ("auto" if args.model else "cpu")))
        args.world_size = ctx.world if ctx is not None else 1
        if ctx is None:
            _train(args)
        else:
            with ctx.guard():
                _train(args)
            distributed.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with interrupts.raising_on_sigterm():      # a SIGTERM outside training still removes temporary files
            return _main(argv)
    except distributed.RankFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelNotSaved as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:            # ENOSPC, EROFS, EPERM, EBUSY, ...: one line naming the path
        print(f"error: {durable.describe(e)}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, interrupts.Terminated) as e:
        saved = getattr(e, "checkpoint", None)
        hint = f"; training state saved in {saved}: run the same command with --resume to continue" if saved else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 143 if isinstance(e, interrupts.Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())

"""``horizon-triton train``: the addition demo (no --model: a fresh "demo" model on CPU) and the fine-tune of a
Hugging Face checkpoint (--model DIR --data FILE.jsonl --out DIR), with DPO's reference pass, LoRA's options and
the final save; the TrainConfig the flags make (train_config, lora_options) serves plan too."""
from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from .. import data
from ..devices import distributed
from ..devices.device import device_kind
from ..state import durable, interrupts
from . import rundir
from .progress import Metrics, Progress

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
# a final save that fails (a full disk, an unwritable --out) with no training checkpoint written either is retried
# this often, for at most this long, the trained state kept in memory meanwhile
SAVE_RETRY_S = float(os.environ.get("HORIZON_TRITON_SAVE_RETRY_S", 60))
SAVE_WAIT_S = float(os.environ.get("HORIZON_TRITON_SAVE_WAIT_S", 3600))


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
    train_cfg = train_config(lr=DEMO["lr"] if args.lr is None else args.lr, weight_decay=DEMO["weight_decay"],
                            lr_schedule="cosine",
                            warmup_steps=DEMO["warmup"], device=args.device or "cpu", seed=args.seed,
                            compute_dtype=args.dtype or DEMO["dtype"], grad_accum_steps=args.grad_accum,
                            **lora_options(args))
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


def prepare_rows(args, tokenizer, seq_len: int, path, out_dir, eval_fraction: float = 0.0, keep_examples: int = 0):
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


def seq_len_for(args, model_cfg) -> int:
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
    seq_len = seq_len_for(args, model_cfg)
    tensorboard = None
    if args.report_to == "tensorboard":
        from .reporting import TensorBoard
        tensorboard = TensorBoard                             # checks the package is there before any work
    # every line is checked, tokenized and packed into row files before training starts: unnamed temporary
    # files, which vanish with this process however it ends
    prepared = prepare_rows(args, tokenizer, seq_len, args.data, data.TEMPORARY, eval_fraction=args.eval_split or 0.0)
    eval_rows, eval_stats = prepared.eval, prepared.stats.get("eval")
    if args.eval_data:
        held = prepare_rows(args, tokenizer, seq_len, args.eval_data, data.TEMPORARY)
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
        train_cfg = train_config(lr=FINETUNE["lr"] if args.lr is None else args.lr, warmup_steps=args.warmup,
                                seed=args.seed, grad_accum_steps=args.grad_accum, device=args.device or "auto",
                                compute_dtype=args.dtype or "bfloat16",
                                lr_schedule="cosine" if args.cosine else "constant",
                                objective=args.objective or "sft",
                                **{k: getattr(args, k) for k in ("dpo_beta", "dpo_label_smoothing", "dpo_loss")
                                   if getattr(args, k) is not None},
                                **lora_options(args))
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


# TrainConfig's settings the command line sets, by the flag that sets them (its errors name the flag)
FLAGS = {"lr": "--lr", "warmup_steps": "--warmup", "grad_accum_steps": "--grad-accum", "dpo_beta": "--dpo-beta",
         "dpo_label_smoothing": "--dpo-label-smoothing", "dpo_loss": "--dpo-loss", "lora_rank": "--lora-rank",
         "lora_alpha": "--lora-alpha", "lora_targets": "--lora-targets",
         "lora_target_parameters": "--lora-target-parameters", "compute_dtype": "--dtype",
         "device": "--device"}


def train_config(**settings):
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


def lora_options(args) -> dict:
    """TrainConfig's LoRA settings from --lora-rank, --lora-alpha, --lora-targets, --lora-target-parameters
    (TrainConfig checks them, the target names against the model when its store is built)."""
    parameters = getattr(args, "lora_target_parameters", None)
    if args.lora_rank is None:
        if getattr(args, "merge", False) or args.lora_alpha is not None or args.lora_targets is not None \
                or parameters is not None:
            raise ValueError("--lora-alpha, --lora-targets, --lora-target-parameters and --merge need --lora-rank R "
                             "(a LoRA run)")
        return {}
    options = {"lora_rank": args.lora_rank}
    if args.lora_alpha is not None:
        options["lora_alpha"] = args.lora_alpha
    for field, given in (("lora_targets", args.lora_targets), ("lora_target_parameters", parameters)):
        if given is not None:
            options[field] = tuple(t.strip() for t in given.split(",") if t.strip())
    return options


def _plot(out: Path, progress: Progress) -> None:
    from .reporting import plot_metrics
    if not distributed.is_main_process():
        return
    try:
        progress.note(f"plot: {plot_metrics(out / 'metrics.jsonl', out / 'metrics.png')}")
    except ImportError as e:
        progress.note(f"no plot: {e}")

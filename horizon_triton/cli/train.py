"""``horizon-triton train``: the addition demo (no --model: a fresh "demo" model on CPU) and the fine-tune of a
Hugging Face checkpoint (--model DIR --data FILE.jsonl --out DIR), with DPO's reference pass and LoRA's options.
The data file is checked, tokenized and packed into row files before the first step."""
from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

from .. import data
from ..devices import distributed
from ..devices.device import device_kind
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
REFERENCE = "reference"      # OUT/reference/{train,eval}.ref: DPO's reference log-probs, kept for --resume


def run_demo(args) -> dict:
    """A fresh "demo" model learns 1-3 digit addition; held-out exact match is printed as it rises."""
    import torch

    from .. import TrainConfig, preset
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
    train_cfg = TrainConfig(lr=DEMO["lr"] if args.lr is None else args.lr, weight_decay=DEMO["weight_decay"],
                            lr_schedule="cosine",
                            warmup_steps=DEMO["warmup"], device=args.device or "cpu", seed=args.seed,
                            compute_dtype=args.dtype or DEMO["dtype"], grad_accum_steps=args.grad_accum,
                            **lora_options(args))
    if args.out is None:          # the demo's default directory holds only earlier demos: rerunning replaces it
        args.overwrite = True
    out = Path(args.out or "runs/demo")
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

    def evaluate(step: int) -> None:
        accuracy = data.exact_match(engine.logits, task)
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
        if engine.step < steps:     # data parallel: rank r trains on every world_size-th batch, from the r-th
            batches = distributed.shard_loader(task.batches(batch_size, seed=args.seed), engine.dist)
            engine.fit(rundir.rest(batches, engine), max_steps=steps - engine.step, callback=on_step)
        progress.close()
        evaluate(steps)
        problems = task.heldout[:5]
        for problem, answer in zip(problems, data.greedy_answers(engine.logits, task, problems)):
            ok = answer == task.target(problem)
            verdict = "ok" if ok else f"expected {problem.answer}"
            progress.note(f"  {task.show(problem)}{task.read_answer(answer)}  {verdict}")
        metrics.save(engine, merge=args.merge)
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
    """data.prepare with the data options (--train-on, --too-long, --workers, --objective) of train and data."""
    return data.prepare(path, tokenizer, seq_len, _pad_id(tokenizer), out_dir, train_on=args.train_on or "assistant",
                        too_long=args.too_long or "drop", workers=_workers(args, path), eval_fraction=eval_fraction,
                        seed=args.seed, keep_examples=keep_examples, preference=args.objective == "dpo")


def _reference_pass(engine, rows, name: str, out: Path, resumed: bool, batch_size: int, progress) -> None:
    """DPO: the reference log-probs of every row from the starting weights, once, into OUT/reference/NAME.ref
    (a forward-only streamed pass, with a progress bar on a terminal); a resumed run reuses that file."""
    from ..objectives import preference
    path = out / REFERENCE / f"{name}.ref"
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
    """--seq-len, checked against the model, or its default."""
    if args.seq_len and args.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} is above the model's max_position_embeddings "
                         f"{model_cfg.max_position_embeddings}")
    return args.seq_len or min(FINETUNE["seq_len"], model_cfg.max_position_embeddings)


def run_finetune(args) -> dict:
    """Fine-tunes the Hugging Face checkpoint in --model on --data; the result goes to --out."""
    from .. import ModelConfig, TrainConfig
    if not args.data:
        raise ValueError("--model needs --data FILE.jsonl")
    if not args.out:
        raise ValueError("--model needs --out DIR for the fine-tuned checkpoint")
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError(f"--out {args.out} is the --model directory; the saved checkpoint replaces --out whole, "
                         "so choose another --out")
    if args.eval_data and args.eval_split:
        raise ValueError("--eval-data and --eval-split both choose the eval set; give one of them")
    if args.objective == "dpo" and args.train_on:
        raise ValueError("--train-on does not apply to --objective dpo: its pairs train their responses only")
    if args.eval_every and not (args.eval_data or args.eval_split):
        raise ValueError("--eval-every needs an eval set: --eval-data FILE or --eval-split FRACTION")
    model_cfg = ModelConfig.from_pretrained(args.model)       # checks the directory before the data is read
    tokenizer = data.load_tokenizer(args.model)
    seq_len = seq_len_for(args, model_cfg)
    tensorboard = None
    if args.report_to == "tensorboard":
        from .reporting import TensorBoard
        tensorboard = TensorBoard                             # checks the package is there before any work
    # every line is checked, tokenized and packed into row files before training starts
    with tempfile.TemporaryDirectory(prefix="horizon-triton-rows-") as rows_dir:
        prepared = prepare_rows(args, tokenizer, seq_len, args.data, rows_dir, eval_fraction=args.eval_split or 0.0)
        eval_rows, eval_stats = prepared.eval, prepared.stats.get("eval")
        if args.eval_data:
            eval_dir = Path(rows_dir) / "eval"
            eval_dir.mkdir()
            held = prepare_rows(args, tokenizer, seq_len, args.eval_data, eval_dir)
            eval_rows, eval_stats = held.train, held.stats["train"]
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
        train_cfg = TrainConfig(lr=FINETUNE["lr"] if args.lr is None else args.lr, warmup_steps=args.warmup,
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

        def evaluate(step: int) -> None:
            if dpo:           # the DPO loss and TRL's metrics on the held-out pairs
                scores = engine.evaluate_preferences(eval_loader)
                loss, extra = scores.pop("loss"), {f"eval_{k}": v for k, v in scores.items()}
            else:
                loss, extra = engine.evaluate(eval_loader), {}
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
            history = engine.fit(rundir.rest(loader, engine), max_steps=steps - engine.step,
                                 callback=on_step) if engine.step < steps else []
            if eval_loader:
                evaluate(steps)
            progress.close()
            if board:
                board.close()
            metrics.save(engine, tokenizer, source=args.model, merge=args.merge)
        finally:
            progress.close()
            metrics.close()
            engine.close()
            prepared.close()
            if args.eval_data:
                held.close()
    _plot(out, progress)
    final = f"final loss {history[-1]['loss']:.4f}; " if history else ""
    progress.note(f"done in {time.perf_counter() - start:.0f} s; {final}model and metrics.jsonl in {out}")
    return {"history": history}


def lora_options(args) -> dict:
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


def _plot(out: Path, progress: Progress) -> None:
    from .reporting import plot_metrics
    if not distributed.is_main_process():
        return
    try:
        progress.note(f"plot: {plot_metrics(out / 'metrics.jsonl', out / 'metrics.png')}")
    except ImportError as e:
        progress.note(f"no plot: {e}")

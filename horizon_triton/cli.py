"""The command line: ``horizon-triton train``.

    horizon-triton train                                   the demo: a fresh "demo" model learns addition on CPU
    horizon-triton train --model DIR --data FILE.jsonl --out DIR   fine-tunes a Hugging Face checkpoint

Both print one progress line per step (rewritten in place on a terminal) and write metrics.jsonl into --out:
one {"kind": "train", ...} line per optimizer step (the engine's history entry) and, for the demo, one
{"kind": "eval", ...} line per held-out evaluation. The fine-tune saves the model with engine.save_pretrained.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from . import data, interrupts, rundir

# The demo's defaults, measured on 2 CPU cores shared with other jobs (128 held-out problems, seed 0):
# - format "pad" (fixed width, "007+045=0052"): held-out exact match 59% at step 200, 96% at step 400; the human
#   format ("7+45=52") stayed at 2%, reversed answers at 8%, after 400 steps;
# - float32: a step took as long as a bfloat16 one on CPU, and learned faster (87-91% vs 30% at step 300);
# - one thread: the ops are tiny ([64 x 13 tokens, hidden 128]); with the cores shared, two threads made the
#   steps 3-6x slower (they wait at barriers for a core).
DEMO = dict(format="pad", steps=400, batch_size=64, lr=3e-3, warmup=30, weight_decay=0.1, eval_every=50,
            dtype="float32", threads=1)
FINETUNE = dict(lr=1e-5, batch_size=8, seq_len=512, warmup=0)


# ------------------------------------------------------------------------------------------------------------
# progress and metrics
# ------------------------------------------------------------------------------------------------------------
def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


class Progress:
    """One line per step: rewritten in place (carriage return) on a terminal, plain lines otherwise.
    ``note`` prints a line of its own (an evaluation) without clobbering the progress line."""

    def __init__(self, total: int | None, stream=None):
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty()
        self._width = 0          # length of the progress line on screen, to blank it when it gets shorter

    def step(self, entry: dict) -> None:
        total = f"/{self.total}" if self.total else ""
        line = (f"step {entry['step']}{total}  loss {entry['loss']:.4f}  {entry['tokens_per_s']:,.0f} tok/s  "
                f"rss {_mib(entry['host_rss_peak_bytes'])}  device peak {_mib(entry['device_peak_bytes'])}")
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
        self._width = 0


class Metrics:
    """metrics.jsonl in the output directory, one JSON object a line, flushed as it goes (so it can be followed
    with tail -f). engine.save_pretrained swaps in a new directory (holding a copy of this file), so ``save``
    reopens it. A resumed run (``resumed_step``) continues the file from its checkpoint's step."""

    def __init__(self, out_dir: Path, resumed_step: int | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.path = out_dir / "metrics.jsonl"
        if resumed_step is not None:
            rundir.continue_metrics(self.path, resumed_step)
        self._file = self.path.open("w" if resumed_step is None else "a", encoding="utf-8")

    def write(self, kind: str, entry: dict) -> None:
        self._file.write(json.dumps({"kind": kind, **entry}) + "\n")
        self._file.flush()

    def save(self, engine, tokenizer=None, source=None) -> None:
        """The final model into out_dir: weights, config, the tokenizer and generation_config.json of the
        ``source`` model, and this file, assembled beside out_dir and swapped in as one unit (the run's
        checkpoints move into the new directory)."""
        self._file.close()

        def add_files(tmp: Path) -> None:
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if source is not None and (Path(source) / "generation_config.json").is_file():
                shutil.copy2(Path(source) / "generation_config.json", tmp / "generation_config.json")
            shutil.copy2(self.path, tmp / self.path.name)
        engine.save_pretrained(self.out_dir, add_files=add_files)
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------------------------
# the two jobs
# ------------------------------------------------------------------------------------------------------------
def run_demo(args) -> dict:
    """A fresh "demo" model learns 1-3 digit addition; held-out exact match is printed as it rises."""
    import torch

    from . import TrainConfig, preset
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or DEMO["threads"])
    task = data.AdditionTask(min_digits=1, max_digits=3, num_heldout=args.eval_problems, seed=args.seed,
                             pad="pad" in args.format, reverse="reverse" in args.format)
    model_cfg = preset("demo")
    if model_cfg.vocab_size < task.tokenizer.vocab_size:
        raise ValueError(f"the demo preset's vocab_size {model_cfg.vocab_size} is below the addition "
                         f"vocabulary's {task.tokenizer.vocab_size}")
    steps = args.steps or DEMO["steps"]
    train_cfg = TrainConfig(lr=DEMO["lr"] if args.lr is None else args.lr, weight_decay=DEMO["weight_decay"],
                            lr_schedule="cosine",
                            warmup_steps=DEMO["warmup"], device=args.device or "cpu", seed=args.seed,
                            compute_dtype=args.dtype or DEMO["dtype"], grad_accum_steps=args.grad_accum)
    out = Path(args.out or "runs/demo")
    engine, resumed = rundir.start(args, out, model_cfg, train_cfg)
    metrics, progress = Metrics(out, engine.step if resumed else None), Progress(steps)
    batch_size = args.batch_size or DEMO["batch_size"]
    progress.note(f"demo: {model_cfg.num_parameters():,} parameter model learns {task.min_digits}-{task.max_digits} "
                  f"digit addition ({steps} steps of {batch_size * args.grad_accum} problems, lr {train_cfg.lr}, "
                  f"{train_cfg.compute_dtype} on {train_cfg.device}); exact match on {len(task.heldout)} "
                  f"held-out problems every {args.eval_every} steps")
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
        if entry["step"] % args.eval_every == 0 and entry["step"] != steps:
            evaluate(entry["step"])

    try:
        if not resumed:
            evaluate(0)
        if engine.step < steps:
            engine.fit(rundir.rest(task.batches(batch_size, seed=args.seed), engine), max_steps=steps - engine.step,
                       callback=on_step)
        evaluate(steps)
        problems = task.heldout[:5]
        for problem, answer in zip(problems, data.greedy_answers(engine.logits, task, problems)):
            ok = answer == task.target(problem)
            verdict = "ok" if ok else f"expected {problem.answer}"
            progress.note(f"  {task.show(problem)}{task.read_answer(answer)}  {verdict}")
        metrics.save(engine)
    finally:
        progress.close()
        metrics.close()
        engine.close()
    progress.note(f"done in {time.perf_counter() - start:.0f} s; model and metrics.jsonl in {out}")
    return {"curve": curve}


def run_finetune(args) -> dict:
    """Fine-tunes the Hugging Face checkpoint in --model on --data; the result goes to --out."""
    from . import ModelConfig, TrainConfig
    if not args.data:
        raise ValueError("--model needs --data FILE.jsonl")
    if not args.out:
        raise ValueError("--model needs --out DIR for the fine-tuned checkpoint")
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError(f"--out {args.out} is the --model directory; the saved checkpoint replaces --out whole, "
                         "so choose another --out")
    model_cfg = ModelConfig.from_pretrained(args.model)       # checks the directory before the data is read
    tokenizer = data.load_tokenizer(args.model)
    records = data.read_jsonl(args.data)                      # every line is checked before training starts
    seq_len = args.seq_len or min(FINETUNE["seq_len"], model_cfg.max_position_embeddings)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    rows = data.pack_documents(data.tokenize_records(records, tokenizer), seq_len, pad_id)
    top = max(int(r["input_ids"].max()) for r in rows)
    if top >= model_cfg.vocab_size:
        raise ValueError(f"the tokenizer in {args.model} gives token id {top}, but the model's vocab_size is "
                         f"{model_cfg.vocab_size}: the tokenizer does not belong to this model")
    batch_size = args.batch_size or FINETUNE["batch_size"]
    steps = args.steps or data.steps_per_epoch(len(rows), batch_size, args.grad_accum)
    loader = data.RowLoader(rows, batch_size, steps, args.grad_accum, seed=args.seed)
    train_cfg = TrainConfig(lr=FINETUNE["lr"] if args.lr is None else args.lr, warmup_steps=args.warmup, seed=args.seed,
                            grad_accum_steps=args.grad_accum, device=args.device or "auto",
                            compute_dtype=args.dtype or "bfloat16",
                            lr_schedule="cosine" if args.cosine else "constant")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    engine, resumed = rundir.start(args, out, model_cfg, train_cfg)
    metrics, progress = Metrics(out, engine.step if resumed else None), Progress(steps)
    progress.note(f"fine-tune {args.model}: {model_cfg.num_parameters():,} parameters, {len(records)} records in "
                  f"{len(rows)} rows of {seq_len} tokens, {steps} steps of {batch_size}x{args.grad_accum} rows, "
                  f"lr {train_cfg.lr}, {train_cfg.compute_dtype} on {engine.device.type}")
    start = time.perf_counter()

    def on_step(entry: dict) -> None:
        metrics.write("train", entry)
        progress.step(entry)

    try:
        history = engine.fit(rundir.rest(loader, engine), max_steps=steps - engine.step,
                             callback=on_step) if engine.step < steps else []
        progress.close()
        metrics.save(engine, tokenizer, source=args.model)
    finally:
        progress.close()
        metrics.close()
        engine.close()
    final = f"final loss {history[-1]['loss']:.4f}; " if history else ""
    progress.note(f"done in {time.perf_counter() - start:.0f} s; {final}model and metrics.jsonl in {out}")
    return {"history": history}


# ------------------------------------------------------------------------------------------------------------
# argument parsing
# ------------------------------------------------------------------------------------------------------------
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="horizon-triton", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the addition demo (no arguments) or fine-tune a checkpoint",
                           description="With no --model: the addition demo on CPU. With --model DIR --data "
                                       "FILE.jsonl --out DIR: fine-tune that Hugging Face checkpoint.")
    train.add_argument("--model", help="Hugging Face model directory (config.json, safetensors, tokenizer)")
    train.add_argument("--data", help="JSONL file: {\"text\": ...} or {\"prompt\": ..., \"response\": ...} a line")
    train.add_argument("--out", help="output directory (demo default: runs/demo)")
    train.add_argument("--steps", type=_positive, help=f"optimizer steps (demo: {DEMO['steps']}; fine-tune: one "
                                                       "pass over the data)")
    train.add_argument("--batch-size", type=_positive, help=f"rows a micro-batch (demo: {DEMO['batch_size']}; "
                                                            f"fine-tune: {FINETUNE['batch_size']})")
    train.add_argument("--lr", type=float, help=f"peak learning rate (demo: {DEMO['lr']}; fine-tune: "
                                                f"{FINETUNE['lr']})")
    train.add_argument("--seq-len", type=_positive, help="fine-tune: tokens a packed row (default: 512, at most "
                                                         "max_position_embeddings)")
    train.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches an optimizer step")
    train.add_argument("--warmup", type=int, default=0, help="fine-tune: linear warm-up steps")
    train.add_argument("--cosine", action="store_true", help="fine-tune: cosine decay to 0 (default: constant)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", choices=["cpu", "cuda", "auto"], help="demo: cpu; fine-tune: auto")
    train.add_argument("--dtype", choices=["bfloat16", "float32"], help=f"compute dtype (demo: {DEMO['dtype']}; "
                                                                        "fine-tune: bfloat16)")
    train.add_argument("--eval-every", type=_positive, default=DEMO["eval_every"], help="demo: steps between "
                                                                                          "evaluations")
    train.add_argument("--format", choices=["plain", "pad", "reverse", "pad-reverse"], default=DEMO["format"],
                       help="demo: how sums are written for the model (see data.AdditionTask)")
    train.add_argument("--threads", type=_positive, help=f"torch CPU threads (demo: {DEMO['threads']}; fine-tune: "
                                                         "torch's default)")
    train.add_argument("--eval-problems", type=_positive, default=256, help="demo: held-out problems")
    _add_checkpoint_options(train)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.model:
            run_finetune(args)
        else:
            if args.data or args.seq_len:
                raise ValueError("--data and --seq-len are for fine-tuning and need --model DIR")
            run_demo(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, interrupts.Terminated) as e:
        saved = getattr(e, "checkpoint", None)
        hint = f"; training state saved in {saved}: run the same command with --resume to continue" if saved else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 143 if isinstance(e, interrupts.Terminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

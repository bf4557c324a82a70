"""The command line: ``horizon-triton train`` and ``horizon-triton plan``.

    horizon-triton train                                   the demo: a fresh "demo" model learns addition on CPU
    horizon-triton train --model DIR --data FILE.jsonl --out DIR   fine-tunes a Hugging Face checkpoint
    horizon-triton plan --model DIR|config.json [--tokens-per-step N] [--gpu h100] [--host-ram 1.5TB]
                                                           memory and speed of a run, from the config alone

Both print one progress line per step (rewritten in place on a terminal) and write metrics.jsonl into --out:
one {"kind": "train", ...} line per optimizer step (the engine's history entry) and, for the demo, one
{"kind": "eval", ...} line per held-out evaluation. The fine-tune saves the model with engine.save_pretrained.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import data

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
    with tail -f). engine.save_pretrained swaps in a new directory (keeping this file), so ``save`` reopens it."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.path = out_dir / "metrics.jsonl"
        self._file = self.path.open("w", encoding="utf-8")

    def write(self, kind: str, entry: dict) -> None:
        self._file.write(json.dumps({"kind": kind, **entry}) + "\n")
        self._file.flush()

    def save(self, engine, tokenizer=None) -> None:
        """The checkpoint (and the tokenizer, so that the directory is a complete model) into out_dir."""
        self._file.close()
        engine.save_pretrained(self.out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(self.out_dir))
        self._file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------------------------
# the two jobs
# ------------------------------------------------------------------------------------------------------------
def run_demo(args) -> dict:
    """A fresh "demo" model learns 1-3 digit addition; held-out exact match is printed as it rises."""
    import torch

    from . import Engine, TrainConfig, preset
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
    engine = Engine(model_cfg, train_cfg)
    out = Path(args.out or "runs/demo")
    metrics, progress = Metrics(out), Progress(steps)
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
        evaluate(0)
        engine.fit(task.batches(batch_size, seed=args.seed), max_steps=steps, callback=on_step)
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
    from . import Engine, ModelConfig, TrainConfig
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
    engine = Engine(model_cfg, train_cfg)
    out = Path(args.out)
    metrics, progress = Metrics(out), Progress(steps)
    progress.note(f"fine-tune {args.model}: {model_cfg.num_parameters():,} parameters, {len(records)} records in "
                  f"{len(rows)} rows of {seq_len} tokens, {steps} steps of {batch_size}x{args.grad_accum} rows, "
                  f"lr {train_cfg.lr}, {train_cfg.compute_dtype} on {engine.device.type}")
    start = time.perf_counter()

    def on_step(entry: dict) -> None:
        metrics.write("train", entry)
        progress.step(entry)

    try:
        history = engine.fit(loader, max_steps=steps, callback=on_step)
        progress.close()
        metrics.save(engine, tokenizer)
    finally:
        progress.close()
        metrics.close()
        engine.close()
    progress.note(f"done in {time.perf_counter() - start:.0f} s; final loss {history[-1]['loss']:.4f}; "
                  f"model and metrics.jsonl in {out}")
    return {"history": history}


def run_plan(args) -> dict:
    """Prints the plan of --model on --gpu, and the deepest model of its shape that fits --host-ram and the card."""
    from .config import PRESETS, ModelConfig, TrainConfig, preset
    from .device import host_memory_info
    from .plan import format_plan, largest_model, parse_bytes, plan
    path = Path(args.model)
    if path.is_file():
        if path.name != "config.json":
            raise ValueError(f"--model {args.model}: give a model directory or its config.json")
        path = path.parent
    model_cfg = preset(args.model) if args.model in PRESETS and not path.exists() else ModelConfig.from_pretrained(path)
    train_cfg = TrainConfig(compute_dtype=args.dtype, grad_accum_steps=args.grad_accum)
    host_ram = parse_bytes(args.host_ram) if args.host_ram else host_memory_info()[1]
    options = dict(tokens_per_step=args.tokens_per_step, hardware=args.gpu, seq_len=args.seq_len)
    result = plan(model_cfg, train_cfg, host_memory_bytes=host_ram, **options)
    largest = largest_model(model_cfg, train_cfg, host_memory_bytes=host_ram, **options)
    print(format_plan(result, largest))
    if largest is None:
        print(f"  not even one layer of this shape fits {args.gpu} with {host_ram / 1e12:.2f} TB of host memory")
    return {"plan": result, "largest": largest}


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

    from .plan import HARDWARE
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plan":
            run_plan(args)
        elif args.model:
            run_finetune(args)
        else:
            if args.data or args.seq_len:
                raise ValueError("--data and --seq-len are for fine-tuning and need --model DIR")
            run_demo(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

This module parses the command line and runs the subcommand: train.py (the demo and the fine-tune), data.py,
plan.py; progress.py shows and records a run, rundir.py keeps its output directory, reporting.py plots it.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .. import data
from ..devices import distributed
from ..devices.device import device_kind
from ..state import durable, interrupts
from . import rundir
from .data import run_data
from .plan import run_plan
from .train import DEMO, FINETUNE, ModelNotSaved, run_demo, run_finetune

DEMO_ONLY = ("format", "eval_problems")
FINETUNE_ONLY = ("data", "seq_len", "epochs", "eval_data", "eval_split", "train_on", "too_long", "workers",
                 "report_to", "objective", "dpo_beta", "dpo_label_smoothing", "dpo_loss")


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
    plan.add_argument("--moe-skew", type=float, default=2.0, metavar="S",
                      help="mixture-of-experts models: plan skewed routing too, the busiest expert getting S × the "
                           "balanced tokens (default: 2)")
    _add_lora_options(plan, merge=False)
    return parser


def _add_lora_options(parser, merge: bool) -> None:
    group = parser.add_argument_group("LoRA", "adapters on a frozen base (peft's LoraConfig names and defaults)")
    group.add_argument("--lora-rank", type=_positive, metavar="R", help="train rank-R LoRA adapters, the base frozen "
                                                                         "(default: full fine-tune)")
    group.add_argument("--lora-alpha", type=float, help="adapter scaling alpha / R (default 8, as peft)")
    group.add_argument("--lora-targets", metavar="NAMES", help="comma-separated projections, as peft's "
                       "target_modules: among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj for "
                       "Llama/Mistral/Qwen2/Qwen3, any decoder layer's nn.Linear for other models (default: "
                       "q_proj,v_proj)")
    group.add_argument("--lora-target-parameters", metavar="NAMES", help="comma-separated MoE experts' fused "
                       "weights, as peft's target_parameters (e.g. mlp.experts.gate_up_proj,mlp.experts.down_proj; "
                       "models whose experts run on our MoE kernels)")
    if merge:
        group.add_argument("--merge", action="store_true", help="save the base with the adapters merged in (a "
                           "full model for transformers) instead of the adapters in peft's format")


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

"""How many kernel specializations a run compiles on a GPU, counted on a CPU in Triton's interpreter.

    python perf/compile_counts.py pytest tests/test_attention.py -m "not slow" -k "..."   # a pytest selection
    python perf/compile_counts.py engine [--head-dim 128] [--window W] [--canary-only]     # the engine's canary
                                                                                           # and a toy step

A compiled Triton kernel is compiled once per specialization: its constexpr values, num_warps and num_stages,
the dtype of each tensor and whether its address is 16-byte aligned, and for each integer argument whether it is
1 or a multiple of 16 (Triton's defaults). The interpreter runs the same launches without compiling, so wrapping
its launch and keeping the distinct keys counts what a cold GPU machine would compile (1 to 3 s each on an H100
host, more where a kernel spills): the GPU check (perf/gpu_check.py) sizes its time boxes from these counts.
Prints {"total": N, "kernels": {name: count}} as the last line.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"        # before any kernel module is imported
ROOT = Path(__file__).resolve().parent.parent


def specialization(fn, args: tuple, kwargs: dict) -> tuple:
    """Triton's compile key for one launch of ``fn`` (a @triton.jit function) with these arguments."""
    import torch
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args)) | kwargs
    key = []
    for p in params:
        value = bound.get(p.name, p.default)
        if "constexpr" in str(p.annotation):
            key.append((p.name, repr(value)))
        elif isinstance(value, torch.Tensor):
            key.append((p.name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or value is None:
            key.append((p.name, repr(value)))
        elif isinstance(value, int):
            key.append((p.name, "i64" if abs(value) >= 2 ** 31 else "i32", value == 1, value % 16 == 0))
        else:
            key.append((p.name, type(value).__name__))
    key += [(k, kwargs.get(k)) for k in ("num_warps", "num_stages")]
    return tuple(key)


class Counter:
    """Wraps the interpreter's launch; ``counts()`` -> {kernel name: distinct specializations}."""

    def __init__(self):
        from triton.runtime.interpreter import InterpretedFunction
        self.seen: dict[str, set] = {}
        launch = InterpretedFunction.run
        counter = self

        def counted(self, *args, grid, warmup, **kwargs):
            counter.seen.setdefault(self.fn.__name__, set()).add(specialization(self.fn, args, kwargs))
            return launch(self, *args, grid=grid, warmup=warmup, **kwargs)
        InterpretedFunction.run = counted

    def counts(self) -> dict:
        kernels = {name: len(keys) for name, keys in sorted(self.seen.items())}
        return {"total": sum(kernels.values()), "kernels": kernels}


def engine(head_dim: int, window: int | None, counter: Counter, canary_only: bool) -> None:
    """The start-up canary at the model's head dim (what Engine runs before its first step on CUDA; its count is
    printed first) and two steps of a toy model whose sizes are multiples of 16, as the real widths are."""
    import torch

    import horizon_triton as ht
    from horizon_triton.devices import canary
    from horizon_triton.models.ops import load_ops
    with torch.no_grad():
        canary.run(load_ops("triton-interpret"), load_ops("torch"), torch.device("cpu"), torch.bfloat16, head_dim,
                   window)
    print(json.dumps({"canary": counter.counts()}), flush=True)
    if canary_only:
        return
    os.environ["HORIZON_KERNELS"] = "interpret"
    heads = 2
    cfg = ht.preset("llama-8b", hidden_size=heads * head_dim, intermediate_size=4 * head_dim, num_heads=heads,
                    num_kv_heads=1, num_layers=2, vocab_size=512, sliding_window=window)
    eng = ht.Engine(cfg, ht.TrainConfig(device="cpu", compute_dtype="bfloat16", lr=1e-5))
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    eng.fit([{"input_ids": ids, "labels": ids}] * 2)
    eng.close()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("pytest", "engine"):
        print(__doc__, file=sys.stderr)
        return 2
    counter = Counter()
    if argv[0] == "pytest":
        import pytest
        sys.path.insert(0, str(ROOT / "tests"))
        status = pytest.main(["-q", "-p", "no:cacheprovider", *argv[1:]])
        if status not in (0, 5):
            print(f"compile_counts: pytest exit status {status}; counts cover the tests that ran", file=sys.stderr)
    else:
        import argparse
        parser = argparse.ArgumentParser(prog="compile_counts.py engine")
        parser.add_argument("--head-dim", type=int, default=128)
        parser.add_argument("--window", type=int, default=None)
        parser.add_argument("--canary-only", action="store_true", help="stop after the canary")
        args = parser.parse_args(argv[1:])
        engine(args.head_dim, args.window, counter, args.canary_only)
    print(json.dumps(counter.counts()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

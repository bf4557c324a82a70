"""Our engine against DeepSpeed ZeRO-3 with CPU offload of parameters and optimizer: same model, same tokens.

    python perf/zero3_compare.py [--model 8b|70b] [--layers 4] [--batch 4] [--seq 4096] [--steps 4] [--json FILE]
    python perf/zero3_compare.py --device cpu --model toy --layers 1 --batch 2 --seq 16 --steps 3   # smoke test

Both sides train the same ModelConfig from a random init (ours: the engine's; DeepSpeed: transformers'
LlamaForCausalLM built under ZeRO-3's zero.Init), in bf16, with AdamW (lr 1e-5, betas 0.9/0.95, eps 1e-8, weight
decay 0.1 on matrices only), clipping at 1.0, one micro-batch of the same token ids per step. DeepSpeed runs
stage 3 with offload_param and offload_optimizer to pinned CPU memory (DeepSpeedCPUAdam), gradient checkpointing
of every decoder layer (our engine recomputes every layer too) and SDPA attention. Each side runs in a child
process of its own, so GPU and host memory are released between them. The first step is a warm-up; tokens/s is
batch·seq over the median time of the later steps (each DeepSpeed step is timed to a device sync after
engine.step(); ours is the engine's own step time, its CPU AdamW overlapping the next step as in a long run).

Without deepspeed, or without a GPU (unless --device cpu), it prints one line saying so and exits 0.
``--device cpu`` runs both sides on CPU (DeepSpeed's CPU accelerator, gloo): a check of this script on a toy model,
not a measurement. transformers' ZeRO-3 integration needs accelerate (the H200 image has it).

Carrying deepspeed to a GPU machine without network (Python 3.12, torch already there): deepspeed is published as
a source archive only, so build its (pure Python) wheel on a networked machine in an environment that has torch,
setuptools and wheel, then fetch the dependencies the target lacks as wheels for it (the H200 image already has
ninja, numpy, packaging, psutil, py-cpuinfo, msgpack, einops, tqdm):

    pip download --no-deps deepspeed==0.19.8 -d wheels                     # deepspeed-0.19.8.tar.gz
    DS_BUILD_OPS=0 pip wheel --no-deps --no-build-isolation wheels/deepspeed-0.19.8.tar.gz -w wheels
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels \\
        hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions

(pydantic pins one pydantic-core version: take the pair pip resolves together), then on the GPU machine
``pip install --no-index --no-deps wheels/*.whl`` (or ``--target DIR`` and PYTHONPATH=DIR); ``pip check`` there
names anything still missing. DeepSpeedCPUAdam is compiled on first use with ninja and the C++ compiler.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HYPER = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)
WIDTHS = {   # overrides of the llama-8b preset (Llama-3-8B width, 128256 vocabulary)
    "8b": dict(),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8),
    "toy": dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vocab_size=512),  # smoke test
}


def model_config(width: str, layers: int):
    import horizon_triton as ht
    return ht.preset("llama-8b", **WIDTHS[width], num_layers=layers)


def token_batches(vocab_size: int, batch: int, seq: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """The token ids both sides train on: one [batch, seq] micro-batch per step (labels = ids, shifted inside)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (batch, seq), generator=gen) for _ in range(steps)]


def deepspeed_config(micro_batch: int) -> dict:
    """ZeRO-3, parameters and optimizer states offloaded to pinned CPU memory, bf16, AdamW as ours."""
    offload = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": HYPER["max_grad_norm"],
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": HYPER["lr"], "betas": list(HYPER["betas"]),
                                                   "eps": HYPER["eps"], "weight_decay": HYPER["weight_decay"]}},
        "zero_optimization": {"stage": 3, "offload_param": offload, "offload_optimizer": offload,
                              "overlap_comm": True, "contiguous_gradients": True},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def param_groups(model) -> list[dict]:
    """Weight decay on matrices only, as the engine (and torch.optim.AdamW over the same groups) applies it."""
    decay = [p for p in model.parameters() if _ndim(p) >= 2]
    rest = [p for p in model.parameters() if _ndim(p) < 2]
    return [{"params": decay, "weight_decay": HYPER["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]


def _ndim(p) -> int:
    return len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()   # a ZeRO-3 partitioned parameter keeps its shape


# ---- the two sides, each in a child process -------------------------------------------------------------------
def run_deepspeed(cfg, batches, device: str) -> dict:
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                       ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"    # read when deepspeed is imported
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    cuda = device == "cuda"
    ds_config = deepspeed_config(batches[0].shape[0])
    zero3 = HfDeepSpeedConfig(ds_config)      # noqa: F841 (kept alive: from_config builds under zero.Init)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_config(cfg.to_hf_config("bfloat16"), dtype=torch.bfloat16,
                                             attn_implementation="sdpa")
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model), config=ds_config)
    build_s = time.perf_counter() - start
    times, losses = [], []
    for ids in batches:
        ids = ids.to(device)
        if cuda:
            torch.cuda.synchronize()  # sync: time one whole step
        start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()  # sync: the step's GPU work is done (its CPU Adam ran inside engine.step)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return dict(side="deepspeed", version=deepspeed.__version__, build_s=build_s, step_times_s=times, losses=losses,
                device_peak_GiB=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0)


def run_horizon(cfg, batches, device: str) -> dict:
    import horizon_triton as ht
    start = time.perf_counter()
    engine = ht.Engine(cfg, ht.TrainConfig(device=device, **HYPER))
    build_s = time.perf_counter() - start
    history = engine.fit([{"input_ids": ids, "labels": ids} for ids in batches])
    engine.close()
    return dict(side="horizon", kernels=engine.kernel_backend, build_s=build_s,
                step_times_s=[h["time_s"] for h in history], losses=[h["loss"] for h in history],
                device_peak_GiB=max(h.get("device_allocator_peak_bytes", 0) for h in history) / 2 ** 30)


def why_not_runnable(device: str = "cuda") -> str | None:
    reasons = []
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:      # not installed, or a dependency of it missing
        reasons.append(f"deepspeed is not importable ({type(exc).__name__}: {exc}); the docstring says how to "
                       "carry it to a machine without network")
    if device == "cuda" and not torch.cuda.is_available():
        reasons.append("no CUDA GPU visible (--device cpu runs a smoke test of this script)")
    return "; ".join(reasons) or None


def tokens_per_s(result: dict, tokens: int) -> float:
    """batch·seq over the median of the steps after the warm-up."""
    return tokens / statistics.median(result["step_times_s"][1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(WIDTHS), default="8b", help="layer width (vocabulary 128256)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps, the first a warm-up (≥ 2)")
    parser.add_argument("--json", help="also write both sides' figures and the ratio here")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test, not figures")
    parser.add_argument("--side", choices=("deepspeed", "horizon"), help=argparse.SUPPRESS)  # the child's part
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be ≥ 2: the first step is a warm-up")
    cfg = model_config(args.model, args.layers)
    batches = token_batches(cfg.vocab_size, args.batch, args.seq, args.steps)
    if args.side:
        result = (run_deepspeed if args.side == "deepspeed" else run_horizon)(cfg, batches, args.device)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return 0
    reason = why_not_runnable(args.device)
    if reason:
        print(f"zero3_compare: skipped: {reason}")
        return 0
    tokens = args.batch * args.seq
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for side in ("deepspeed", "horizon"):
            result_file = os.path.join(tmp, f"{side}.json")
            child = [sys.executable, os.path.abspath(__file__), "--side", side, "--result", result_file,
                     *(argv if argv is not None else sys.argv[1:])]
            if subprocess.run(child).returncode != 0:
                print(f"zero3_compare: the {side} side failed (its output is above)")
                return 1
            with open(result_file) as f:
                results[side] = json.load(f)
            results[side]["tokens_per_s"] = tokens_per_s(results[side], tokens)
            steps = [round(t, 3) for t in results[side]["step_times_s"]]
            print(f"{side}: {results[side]['tokens_per_s']:,.0f} tokens/s, steps {steps} s, "
                  f"losses {[round(x, 3) for x in results[side]['losses']]}, "
                  f"device peak {results[side]['device_peak_GiB']:.1f} GiB", flush=True)
    ratio = results["horizon"]["tokens_per_s"] / results["deepspeed"]["tokens_per_s"]
    print(f"model {args.model} width, {args.layers} layers ({cfg.num_parameters() / 1e9:.2f} B params), "
          f"{tokens} tokens/step: horizon / DeepSpeed ZeRO-3 offload = {ratio:.2f}×")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, layers=args.layers, parameters=cfg.num_parameters(), device=args.device,
                           tokens_per_step=tokens, ratio=ratio, **results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

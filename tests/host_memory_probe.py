"""Run as a script: trains a wide model of the given depth for two steps and prints JSON with the parameter
count and the growth of peak resident memory (ru_maxrss) over the process's footprint before the model.

    python tests/host_memory_probe.py DEPTH [--states fp32|8bit] [--lora-rank R] [--baseline]

--baseline trains the same model with transformers (fp32 weights) + torch.optim.AdamW instead, the usual way to
fine-tune it on a CPU: what the engine's host store is compared with (perf/RESULTS.md).

The tests run it through ``probe``, each depth in a fresh process so that its peak is its own."""
import argparse
import json
import os
import resource
import subprocess
import sys

import torch

import horizon_triton as ht


def peak_rss() -> int:
    """This process's peak resident memory: VmHWM, which exec resets (Linux's ru_maxrss starts a child at its
    parent's RSS at fork time, so a probe smaller than a large pytest process would measure no growth)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# glibc's malloc returns freed memory to the system at once instead of keeping up to ~35 MB of the step's freed
# temporaries for reuse: how much it keeps depends on which thread's arena each temporary landed in, so it varied
# from run to run (107-153 MB above the store at either depth) and made a slope over 113M added parameters vary
# by +-0.15 B/param. What it keeps does not grow with depth; with it returned, the slope is the store's within 0.02.
MALLOC_RETURNS_FREED = {"MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


def probe(depth: int, *flags: str, malloc_returns_freed: bool = True) -> dict:
    """Runs this script in a fresh process -> its JSON line. malloc_returns_freed: with MALLOC_RETURNS_FREED (for
    slopes); False: glibc's defaults, as a user runs it."""
    env = {**os.environ, **(MALLOC_RETURNS_FREED if malloc_returns_freed else {})}
    out = subprocess.run([sys.executable, __file__, str(depth), *flags], capture_output=True, text=True,
                         check=True, timeout=900, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(shallow: dict, deep: dict, key: str) -> float:
    """Growth of ``key`` per parameter added from the shallow run to the deep one."""
    return (deep[key] - shallow[key]) / (deep["params"] - shallow["params"])


def model_config(depth: int) -> ht.ModelConfig:
    return ht.ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=depth,
                          num_heads=16, num_kv_heads=4)


def engine_run(cfg: ht.ModelConfig, batches, states: str, lora_rank: int | None = None) -> dict:
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", lr=1e-4, optimizer_states=states, lora_rank=lora_rank))
    history = engine.fit(batches)
    return {"params": engine.store.num_parameters(), "store_bytes": engine.store.nbytes(),
            "host_peak_bytes": history[-1]["host_peak_bytes"], "loss": history[-1]["loss"]}


def baseline_run(cfg: ht.ModelConfig, batches) -> dict:
    import transformers
    hf_cfg = cfg.to_hf_config("float32")
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for batch in batches:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)      # the gradients stay allocated, as across real steps
    return {"params": sum(p.numel() for p in model.parameters()), "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("depth", type=int)
    parser.add_argument("--states", default="fp32", choices=["fp32", "8bit"])
    parser.add_argument("--lora-rank", type=int, help="LoRA adapters of this rank on q/v, the base frozen")
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()
    cfg = model_config(args.depth)
    ids = torch.randint(0, cfg.vocab_size, (1, 32))
    batches = [{"input_ids": ids, "labels": ids}] * 2
    before = peak_rss()
    result = baseline_run(cfg, batches) if args.baseline else engine_run(cfg, batches, args.states, args.lora_rank)
    print(json.dumps({**result, "rss_growth": peak_rss() - before}))


if __name__ == "__main__":
    main()

"""The machine's memory of a data-parallel job on one node: the proportional set size (PSS, shared pages split
between the processes that map them) summed over the ranks after two training steps, for one process, two
ranks sharing one host store (the default), and two ranks with a store each.

    python perf/dp_memory.py [--hidden 1024 --layers 8 --vocab 16000]

A 14 B/param store (bf16 compute, split master, fp32 moments). The ranks' PSS sum is what the job takes from
the machine: one store plus each rank's working memory (slots, accumulators, activations on the CPU device).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import horizon_triton as ht
from horizon_triton.devices import distributed


def _pss_bytes() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss line in /proc/self/smaps_rollup")


def _run(rank: int, out: str, spec: dict) -> None:
    torch.set_num_threads(1)
    model = ht.ModelConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                           intermediate_size=spec["hidden"] * 11 // 4, num_layers=spec["layers"], num_heads=8,
                           num_kv_heads=2)
    train = ht.TrainConfig(device="cpu", optimizer_threads=1, share_host_store=spec["shared"])
    g = torch.Generator().manual_seed(rank)
    batches = [{"input_ids": (ids := torch.randint(0, spec["vocab"], (1, 64), generator=g)), "labels": ids}
               for _ in range(2)]
    engine = ht.Engine(model, train)
    engine.fit(batches)
    engine.optimizer.wait_all()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"pss": _pss_bytes(), "store": engine.store.nbytes(),
                                                         "params": model.num_parameters()}))
    if engine.dist is not None:
        engine.dist.barrier()            # every rank measured before any unmaps the shared store
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16000)
    spec = vars(parser.parse_args())
    rows = []
    for world, shared in ((1, True), (2, True), (2, False)):
        with tempfile.TemporaryDirectory() as out:
            distributed.spawn(_run, world, (out, dict(spec, shared=shared)))     # fresh processes, W = 1 too
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
        rows.append((world, shared, sum(r["pss"] for r in ranks), ranks[0]))
    base = rows[0][2]
    print(f"model {rows[0][3]['params']:,} parameters, host store {rows[0][3]['store'] / 1e9:.3f} GB")
    for world, shared, pss, _ in rows:
        what = "one process" if world == 1 else f"{world} ranks, " + ("one shared store" if shared else
                                                                       "a store each")
        print(f"{what:28s} PSS summed over ranks {pss / 1e9:6.3f} GB  ({pss / base:.3f}x one process)")


if __name__ == "__main__":
    main()

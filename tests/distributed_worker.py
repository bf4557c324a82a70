"""One data-parallel rank for tests/test_distributed.py, run by horizon_triton.devices.distributed.spawn (or torchrun):
trains an Engine on its share of the batches and saves what the test compares (history, master weights)."""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

import torch

import horizon_triton as ht
from horizon_triton.devices import distributed
from horizon_triton.objectives import preference

VOCAB = 64


def batches(n: int, seed: int = 1, batch: int = 2, seq: int = 12, vocab: int = VOCAB, pad_id: int | None = None):
    """n micro-batches of random tokens; rows of different lengths where pad_id is given (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        item = {"input_ids": ids, "labels": labels}
        if pad_id is not None:
            mask = torch.ones(batch, seq, dtype=torch.long)
            mask[0, seq - 1 - k % 4:] = 0
            ids[mask == 0] = pad_id
            labels[mask == 0] = -100
            item["attention_mask"] = mask
        out.append(item)
    return out


def pair_rows(n: int, seed: int = 1, seq: int = 12, vocab: int = VOCAB) -> list[dict]:
    """n preference pairs as rows 2k (chosen), 2k+1 (rejected): random tokens, prompts of 2-5 tokens unlabelled."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2 * n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        labels = ids.clone()
        labels[:int(torch.randint(2, 6, (1,), generator=g))] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def training_batches(engine, spec: dict) -> list[dict]:
    """The job's micro-batches (all ranks'): spec["batches"], or with spec["pairs"] (n, seed, per_batch,
    reference_batch) preference pairs with their reference log-probs from ``engine``'s starting weights
    (preference.add_reference: data parallel, each rank computes a share of the reference batches)."""
    if "pairs" not in spec:
        return batches(**spec["batches"])
    p = spec["pairs"]
    rows = preference.add_reference(engine, pair_rows(p["n"], p["seed"]), 2 * p["reference_batch"])
    size = 2 * p["per_batch"]
    return [{k: torch.stack([r[k] for r in rows[a:a + size]]) for k in rows[0]} for a in range(0, len(rows), size)]


def configs(spec: dict) -> tuple[ht.ModelConfig, ht.TrainConfig]:
    """spec["model_dir"]: a Hugging Face model directory (ModelConfig.from_pretrained: a generic model's too), else
    the tiny preset with spec["model"]'s overrides."""
    if spec.get("model_dir"):
        model = ht.ModelConfig.from_pretrained(spec["model_dir"])
    else:
        model = ht.preset("tiny", **spec.get("model", {}))
    train = ht.TrainConfig(**{"lr": 1e-3, "weight_decay": 0.1, "max_grad_norm": 0.5, "device": "cpu",
                              "optimizer_threads": 1, "preflight": False, **spec.get("train", {})})
    return model, train


def masters(engine) -> list[torch.Tensor]:
    """The fp32 master of every layer: of its adapters in a LoRA run (the base is frozen)."""
    adapters = engine.store.lora is not None
    return [engine.store.master_values(i, adapters=adapters).clone() for i in range(engine.store.num_layers)]


def run_rank(rank: int, out_dir: str, spec: dict) -> None:
    """spec: model/train overrides (rank_train: per rank), batches (count, seed, pad_id), per_rank_counts (the
    rank's first so many), no_len (its loader an iterator), steps, fail (rank, step, how: "data", "raise" or "kill"),
    save, checkpoint_to (a training checkpoint at the end), resume (from a checkpoint, skipping the batches it
    had consumed), only_rank (rank, calls: the ``if rank == R:`` idiom after fit, the other ranks ending there
    as a script that falls off its end)."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    model_cfg, train_cfg = configs(spec)
    if spec.get("rank_train"):            # a per-rank override (the mismatched-config test)
        train_cfg = ht.TrainConfig(**{**train_cfg.__dict__, **spec["rank_train"].get(str(rank), {})})
    world = int(os.environ["WORLD_SIZE"])
    fail = spec.get("fail")
    try:
        if spec.get("resume"):            # continue a checkpointed job where it stopped
            engine = ht.Engine.from_checkpoint(spec["resume"], train_cfg)
        else:
            engine = ht.Engine(model_cfg, train_cfg)
        data = training_batches(engine, spec)
        mine = data[rank::world][:spec.get("per_rank_counts", {}).get(str(rank))]
        if fail and fail["rank"] == rank and fail["how"] == "data":     # a bad token id in this rank's batch
            bad = (fail["step"] - 1) * train_cfg.grad_accum_steps
            mine[bad] = dict(mine[bad], input_ids=mine[bad]["input_ids"].clone())
            mine[bad]["input_ids"][0, 0] = VOCAB + 7
        mine = mine[engine.micro_batches:]

        def callback(entry):
            if fail and fail["rank"] == rank and fail["how"] == "raise" and entry["step"] == fail["step"]:
                raise RuntimeError(f"a bug on rank {rank} at step {entry['step']}")
            if fail and fail["rank"] == rank and fail["how"] == "kill" and entry["step"] == fail["step"]:
                os.kill(os.getpid(), signal.SIGKILL)      # as the kernel's OOM killer would
        history = engine.fit(iter(mine) if spec.get("no_len") else mine, max_steps=spec.get("steps"), callback=callback)
        only = spec.get("only_rank")
        if only is not None:
            if rank == only["rank"]:
                calls = {"save_pretrained": lambda: engine.save_pretrained(out / "model"),
                         "save_checkpoint": lambda: engine.save_checkpoint(out / "checkpoints"),
                         "evaluate": lambda: engine.evaluate(mine)}
                for call in only["calls"]:
                    calls[call]()
                torch.save({"history": history, "masters": masters(engine)}, out / f"rank{rank}.pt")
            return
        if spec.get("save"):
            engine.save_pretrained(out / "model")
            engine.save_checkpoint(out / "checkpoints")
        if spec.get("checkpoint_to"):
            engine.save_checkpoint(spec["checkpoint_to"])
        d = engine.dist
        place = {"node": d.node, "num_nodes": d.num_nodes, "local_rank": d.local_rank, "local_world": d.local_world}
        reference = torch.stack([b["ref_logps"] for b in data]) if "pairs" in spec else None
        torch.save({"history": history, "masters": masters(engine), "place": place, "reference": reference},
                   out / f"rank{rank}.pt")
        engine.close()
        distributed.close()
    except BaseException as e:
        (out / f"error{rank}.txt").write_text(f"{type(e).__name__}: {e}")
        traceback.print_exc()
        raise


def run_rank_on_nodes(rank: int, out_dir: str, spec: dict, per_node: int) -> None:
    """run_rank as if the job's ranks ran on nodes of ``per_node`` ranks each (torchrun's node rank and local
    rank in the environment)."""
    os.environ.update(GROUP_RANK=str(rank // per_node), LOCAL_RANK=str(rank % per_node),
                      LOCAL_WORLD_SIZE=str(per_node))
    run_rank(rank, out_dir, spec)


def reduce_shards(rank: int, out_dir: str, per_node: int, cuts: list[int]) -> None:
    """The CUDA path's sharded reduction (reduce-scatter in the node, all-reduce across nodes) run on gloo:
    rank r's tensor is (r + 1)·[0, 1, …, 9]; each local rank keeps its shard of the sum (``cuts`` on one node)."""
    os.environ.update(GROUP_RANK=str(rank // per_node), LOCAL_RANK=str(rank % per_node),
                      LOCAL_WORLD_SIZE=str(per_node))
    ctx = distributed.context("cpu")
    t = torch.arange(10, dtype=torch.float32) * (rank + 1)
    cuts = cuts if per_node == 2 else [0, 10]
    shards = [t[a:b] for a, b in zip(cuts, cuts[1:])]
    ctx.reduce_gradient(t, asynchronous=True, shards=shards).wait()
    torch.save(shards[ctx.local_rank].clone(), Path(out_dir) / f"shard{rank}.pt")
    ctx.barrier()
    distributed.close()                   # no gloo work left to the interpreter's exit


def main() -> None:
    """torchrun entry: python -m torch.distributed.run ... tests/distributed_worker.py OUT SPEC_JSON."""
    run_rank(int(os.environ["RANK"]), sys.argv[1], json.loads(sys.argv[2]))


if __name__ == "__main__":
    main()

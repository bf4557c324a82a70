"""Per-rank traffic of one data-parallel step on CPU (gloo), from the engine's DeviceMeter: bus bytes (h2d, d2h)
and the bytes of the gradients each rank all-reduces, for 1, 2 and 4 ranks, beside what the design predicts.

    python perf/dp_traffic.py [--hidden 256 --layers 4 --vocab 4096 --tokens 512]

Prediction per rank and step, fp32 accumulators (4 B), b = the compute dtype's bytes, P_dec = the decoder
layers' and the head's parameters (lm_head and final norm; the tied head's rows are the embedding's), U_W the
distinct token ids of all W ranks' micro-batches:
    all-reduced  = 4·(P_dec + U_W·H)            (+ the tied case's head chunks: the whole table, 4·V·H)
    on the wire  = 2·(W-1)/W · all-reduced, out of each rank and as much in (a ring all-reduce)
    h2d          = 2·P_layers·b + U_W·H·b      (weights in for the forward and the backward; the gathered rows)
    d2h          = (P_dec + U_W·H)·b            (each gradient once; 4 B per element on CPU, which copies fp32)
so the bus bytes do not shrink with W (every rank streams the whole model), and the union's rows grow with W.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import horizon_triton as ht
from horizon_triton.devices import distributed
from horizon_triton.models.dense.weights import layer_layouts


def _rank(rank: int, out: str, spec: dict) -> None:
    torch.set_num_threads(1)
    history = _train(spec, int(spec["world"]), rank)
    Path(out, f"rank{rank}.json").write_text(json.dumps(history[-1]))


def _model(spec: dict) -> ht.ModelConfig:
    return ht.ModelConfig(vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["hidden"] * 3,
                          num_layers=spec["layers"], num_heads=4, num_kv_heads=2)


def _batches(spec: dict, rank: int) -> list[dict]:
    """Two steps' micro-batches of rank ``rank`` (random ids, seeded by the rank)."""
    g = torch.Generator().manual_seed(rank)
    rows = spec["tokens"] // 64
    return [{"input_ids": (ids := torch.randint(0, spec["vocab"], (rows, 64), generator=g)), "labels": ids}
            for _ in range(2)]


def _train(spec: dict, world: int, rank: int) -> list[dict]:
    train = ht.TrainConfig(device="cpu", compute_dtype="float32", optimizer_threads=1, preflight=False)
    return ht.Engine(_model(spec), train).fit(_batches(spec, rank))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=512, help="tokens a micro-batch (one a step and rank)")
    args = parser.parse_args()
    spec = vars(args)
    H, V = args.hidden, args.vocab
    model = _model(spec)
    p_dec = sum(lay.numel for lay in layer_layouts(model)[1:])
    print(f"model: {model.num_parameters():,} parameters ({p_dec:,} outside the embedding), {args.tokens} tokens a "
          "rank and step, fp32")
    print(f"{'W':>2} {'h2d MB':>8} {'d2h MB':>8} {'all-reduced MB':>15} {'predicted':>10} {'wire out MB':>12}")
    for world in (1, 2, 4):
        if world == 1:
            entry = _train(spec, 1, 0)[-1]
            entry["allreduce_bytes"] = 0
        else:
            with tempfile.TemporaryDirectory() as out:
                distributed.spawn(_rank, world, (out, dict(spec, world=world)))
                entry = json.loads(Path(out, "rank0.json").read_text())
        # the last step's union of every rank's ids
        unique = torch.unique(torch.cat([_batches(spec, r)[-1]["input_ids"].reshape(-1) for r in range(world)]))
        unique = unique.numel()
        predicted = 0 if world == 1 else 4 * (p_dec + unique * H)
        wire = 2 * (world - 1) / world * entry["allreduce_bytes"]
        print(f"{world:>2} {entry['h2d_bytes'] / 1e6:8.2f} {entry['d2h_bytes'] / 1e6:8.2f} "
              f"{entry['allreduce_bytes'] / 1e6:15.2f} {predicted / 1e6:10.2f} {wire / 1e6:12.2f}"
              + f"   (distinct ids of the {world} ranks: {unique})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

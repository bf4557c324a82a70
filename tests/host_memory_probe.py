"""Run as a script: trains a wide model of the given depth for two steps and prints JSON with the parameter
count and the growth of peak resident memory (ru_maxrss) over the process's footprint before the model."""
import json
import resource
import sys

import torch

import horizon_triton as ht


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(depth: int) -> None:
    cfg = ht.ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=depth,
                         num_heads=16, num_kv_heads=4)
    ids = torch.randint(0, cfg.vocab_size, (1, 32))
    batches = [{"input_ids": ids, "labels": ids}] * 2
    before = peak_rss()
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", lr=1e-4))
    history = engine.fit(batches)
    print(json.dumps({"params": engine.store.num_parameters(), "rss_growth": peak_rss() - before,
                      "store_bytes": engine.store.nbytes(), "loss": history[-1]["loss"]}))


if __name__ == "__main__":
    main(int(sys.argv[1]))

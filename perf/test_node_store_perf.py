"""The machine's memory and the optimizer step with 2 local ranks on one node-shared host store (node_store.py).

Each case spawns its ranks (tests/node_store_worker.memory): build a 14 B/param store of 160M parameters, fill
it, write the gradient (each rank its shard), run two optimizer steps, then, while every rank still maps the
store, read each process's PSS (/proc/self/smaps_rollup: a page mapped by n processes counts 1/n in each) and
RSS. ``added_over_store`` = what the store added to the processes' PSS together, over one store's bytes:

    shared-2   2 ranks, one shared store, each updating its shard on 1 thread      expect ~1.0
    private-2  2 processes, a private store each, each updating all of it, 1 thread expect ~2.0
    private-1  1 process, its private store, 2 threads: the step time to compare shared-2's with

``step_s``: the second step's start_step to wait_all, the slowest rank's (both ranks' steps run at once).
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import node_store_worker as worker  # noqa: E402

MODEL = dict(vocab_size=16000, hidden_size=1280, intermediate_size=3456, num_layers=8, num_heads=16,
             num_kv_heads=4, tie_word_embeddings=True)           # 160M parameters: a 2.2 GB store
CASES = {"shared-2": (2, True, 1), "private-2": (2, False, 1), "private-1": (1, False, 2)}


@pytest.mark.benchmark(group="node-store")
@pytest.mark.parametrize("case", list(CASES))
def test_memory_and_step_of_local_ranks(benchmark, record, case):
    world, shared, threads = CASES[case]
    reports = {}

    def run():
        ranks = worker.Ranks(worker.memory, world, MODEL, shared, "fp32", threads)
        reports.update(ranks.collect(world, timeout=900))
        assert ranks.join() == [0] * world
    benchmark.pedantic(run, rounds=1, iterations=1)
    figures = [reports[(r, "memory")] for r in range(world)]
    store_bytes = figures[0]["store_bytes"]
    added = sum(f["pss"] - f["pss_before"] for f in figures)
    record(store_GB=round(store_bytes / 1e9, 3), added_pss_GB=round(added / 1e9, 3),
           added_over_store=round(added / store_bytes, 3),
           rss_GB=[round(f["rss"] / 1e9, 3) for f in figures], step_s=round(max(f["step_s"] for f in figures), 3))

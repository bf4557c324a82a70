"""The generic layer template (transformers' own decoder layers, models/generic) against the hand-written one
(models/dense) on the same Llama, one CPU optimizer step each, side by side in one run.

What the generic path costs where both can train a model: its layers run transformers' module code through
torch.func.functional_call, its backward recomputes each layer under autograd, and the head's norm is
transformers' module; the hand-written template calls the fused ops with its own saved tensors. Workload: a
4-layer Llama (hidden 256, intermediate 704, 8 query / 2 kv heads, vocabulary 4096), one micro-batch of 2 × 256
tokens a step, 2 compute threads, in fp32 and bf16 compute. A step is ``fit`` of one batch and the wait for its
AdamW. Rounds interleave the two engines so that both see the same machine load; the figures are the fastest
round of each and their ratio (generic / hand-written).
"""
import time

import pytest
import torch

import horizon_triton as ht
from horizon_triton.models.generic.config import GenericConfig

CFG = ht.ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                     num_kv_heads=2)
BATCH, SEQ, THREADS, ROUNDS = 2, 256, 2, 5


@pytest.mark.benchmark(group="generic-step")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generic_step_against_hand_written(benchmark, record, dtype):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    ids = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    train = ht.TrainConfig(device="cpu", lr=1e-4, compute_dtype=dtype)
    engines = {"hand_written": ht.Engine(CFG, train),
               "generic": ht.Engine(GenericConfig.from_hf(CFG.to_hf_config(dtype)), train)}

    def stepper(engine):
        def step():
            engine.fit([batch])
            engine.optimizer.wait_all()
        return step

    steps = {name: stepper(engine) for name, engine in engines.items()}
    for step in steps.values():
        step()                                           # warm-up: allocator, OpenMP pools, the layer inputs' code
    runs = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            runs[name].append(time.perf_counter() - start)
    benchmark.pedantic(steps["generic"], rounds=1, iterations=1)
    best = {name: min(runs[name]) for name in steps}
    record(model=f"{CFG.num_parameters() / 1e6:.1f}M", dtype=dtype, tokens_per_step=BATCH * SEQ, threads=THREADS,
           generic_step_s=best["generic"], hand_written_step_s=best["hand_written"],
           generic_over_hand_written=best["generic"] / best["hand_written"],
           generic_rounds_s=[round(t, 3) for t in runs["generic"]],
           hand_written_rounds_s=[round(t, 3) for t in runs["hand_written"]])
    for engine in engines.values():
        engine.close()
    torch.set_num_threads(threads)

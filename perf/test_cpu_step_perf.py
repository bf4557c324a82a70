"""The engine's CPU step against transformers' on the same work, side by side in one run.

The CPU path is what the demo, the tests and every parity check run. Workload: a 6-layer Llama (hidden 512,
intermediate 1408, 8 query / 2 kv heads, vocabulary 8192), fp32, one micro-batch of 2 × 1024 tokens a step, 2
compute threads. The engine (torch references, aten's CPU flash attention, its CPU AdamW on its own thread)
against transformers' LlamaForCausalLM with gradient checkpointing (it recomputes each layer in the backward, as
the engine does) and torch.optim.AdamW(fused=True), on the same tokens. A step is forward, backward and AdamW:
the engine's is ``fit`` of one batch and the wait for its AdamW (which otherwise overlaps the next step's
forward). Rounds interleave the two, so that both see the same machine load; the figures are the fastest round
of each, their ratio, and the system time of each process share (page faults of fresh allocations show there).
"""
import resource
import time

import pytest
import torch

import horizon_triton as ht

CFG = ht.ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8,
                     num_kv_heads=2)
BATCH, SEQ, THREADS, ROUNDS = 2, 1024, 2, 6


def _timed(step) -> tuple[float, float]:
    """(wall seconds, system seconds) of one call."""
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
    step()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_stime - before


@pytest.mark.benchmark(group="cpu-step")
def test_cpu_step_against_transformers(benchmark, record):
    import transformers

    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    ids = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    engine = ht.Engine(CFG, ht.TrainConfig(device="cpu", lr=1e-4, compute_dtype="float32"))
    hf_cfg = CFG.to_hf_config("float32")
    hf_cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(hf_cfg)
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def ours():
        engine.fit([batch])
        engine.optimizer.wait_all()

    def theirs():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    steps = {"ours": ours, "transformers": theirs}
    for step in steps.values():
        step()                                           # warm-up: allocator, OpenMP pools
    runs = {name: [] for name in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            runs[name].append(_timed(step))
    benchmark.pedantic(ours, rounds=1, iterations=1)
    best = {name: min(runs[name]) for name in steps}
    record(model=f"{CFG.num_parameters() / 1e6:.1f}M", tokens_per_step=BATCH * SEQ, threads=THREADS,
           ours_step_s=best["ours"][0], transformers_step_s=best["transformers"][0],
           ours_over_transformers=best["ours"][0] / best["transformers"][0],
           ours_sys_s=best["ours"][1], transformers_sys_s=best["transformers"][1],
           ours_rounds_s=[round(w, 3) for w, _ in runs["ours"]],
           transformers_rounds_s=[round(w, 3) for w, _ in runs["transformers"]], kernels=engine.kernel_report)
    engine.close()
    torch.set_num_threads(threads)

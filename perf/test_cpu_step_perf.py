"""The engine's CPU step against transformers' on the same work, side by side in one run.

The CPU path is what the demo, the tests and every parity check run. Workload: a 6-layer Llama (hidden 512,
intermediate 1408, 8 query / 2 kv heads, vocabulary 8192), fp32, one micro-batch of 2 × 1024 tokens a step, 2
compute threads. The engine (torch references, aten's CPU flash attention, its CPU AdamW on its own thread)
against transformers' LlamaForCausalLM with gradient checkpointing (it recomputes each layer in the backward, as
the engine does) and torch.optim.AdamW(fused=True), on the same tokens. A step is forward, backward and AdamW:
the engine's is ``fit`` of one batch and the wait for its AdamW (which otherwise overlaps the next step's
forward). Rounds interleave the two, so that both see the same machine load; the figures are the fastest round
of each, their ratio, and the system time of each process share (page faults of fresh allocations show there).

The same on a mixture-of-experts model (``qwen3_moe``: 4 layers, hidden 256, 16 experts of 256 routed top-4,
vocabulary 8192, 2 × 512 tokens): the engine's generic template with the experts on its MoE ops (the references'
per-expert loop on CPU) against transformers' Qwen3MoeForCausalLM (its grouped_mm experts), likewise.
"""
import resource
import time

import pytest
import torch

import horizon_triton as ht

CFG = ht.ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=6, num_heads=8,
                     num_kv_heads=2)
MOE = dict(vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_experts=16,
           num_experts_per_tok=4, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
           max_position_embeddings=2048)
THREADS, ROUNDS = 2, 6
WORKLOADS = {"llama": (2, 1024), "qwen3_moe": (2, 512)}      # rows, tokens a row


def _models(workload: str):
    """(our engine's model config, transformers' model in train mode), the same weights' shapes, fp32."""
    import transformers
    if workload == "llama":
        hf_cfg = CFG.to_hf_config("float32")
        hf_cfg._attn_implementation = "sdpa"
        return CFG, transformers.LlamaForCausalLM(hf_cfg)
    from horizon_triton.models.generic.config import GenericConfig
    hf_cfg = transformers.AutoConfig.for_model(workload, **MOE)
    hf_cfg._attn_implementation = "sdpa"
    return GenericConfig.from_hf(hf_cfg), transformers.AutoModelForCausalLM.from_config(hf_cfg)


def _timed(step) -> tuple[float, float]:
    """(wall seconds, system seconds) of one call."""
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
    step()
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_stime - before


@pytest.mark.benchmark(group="cpu-step")
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_cpu_step_against_transformers(benchmark, record, workload):
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    cfg, model = _models(workload)
    rows, seq = WORKLOADS[workload]
    ids = torch.randint(0, cfg.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", lr=1e-4, compute_dtype="float32"))
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
    record(model=f"{workload} {cfg.num_parameters() / 1e6:.1f}M", tokens_per_step=rows * seq, threads=THREADS,
           ours_step_s=best["ours"][0], transformers_step_s=best["transformers"][0],
           ours_over_transformers=best["ours"][0] / best["transformers"][0],
           ours_sys_s=best["ours"][1], transformers_sys_s=best["transformers"][1],
           ours_rounds_s=[round(w, 3) for w, _ in runs["ours"]],
           transformers_rounds_s=[round(w, 3) for w, _ in runs["transformers"]], kernels=engine.kernel_report)
    engine.close()
    torch.set_num_threads(threads)

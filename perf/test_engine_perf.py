"""Whole-step throughput of the engine and the streaming it hides.

On a GPU: a Llama-3.2-1B-shaped model (bf16, 16K tokens per step) and an 8B-shaped one when host RAM allows;
on CPU: the tiny preset (the figures then only show that the path runs).

FLOP counts (per optimizer step, T tokens, P parameters without the embedding):
    6PT      = 6 · P · T                                       (the convention of the reference papers)
    model    = 6PT + 3 · 2 · 2 · B · S² · Hq · D · L / 2       (attention matmuls fwd+bwd, causal half)
Recompute is not counted in either, so both are the useful work per second.
"""
import json
import os

import pytest
import torch
from bench import copy_gbps, engine_flops, peak_tflops

import horizon_triton as ht


def _workload(device):
    if device.type == "cuda":
        total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        name = "llama-8b" if total_ram > 16 * 8.1e9 * 1.3 else "llama-1b"
        return ht.preset(name), 4, 4096, 1          # batch 4 × 4096 tokens = 16K tokens per step
    return ht.preset("tiny"), 2, 64, 2


@pytest.mark.benchmark(group="engine-step")
def test_engine_step(benchmark, record, device, tmp_path):
    cfg, batch, seq, accum = _workload(device)
    trace = tmp_path / "trace.json"
    engine = ht.Engine(cfg, ht.TrainConfig(device=device.type, lr=1e-5, grad_accum_steps=accum,
                                           trace_path=str(trace)))
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    batches = [{"input_ids": ids, "labels": ids}] * accum
    engine.fit(batches)                                 # warm-up: kernel compilation, pinned pools

    history = []
    benchmark.pedantic(lambda: history.extend(engine.fit(batches)), rounds=3, iterations=1)
    step_s = min(h["time_s"] for h in history)
    six_pt, model, tokens = engine_flops(cfg, batch, seq, accum)
    events = json.loads(trace.read_text())
    summary = events["otherData"]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_tflops(name)
    record(model=f"{cfg.num_parameters() / 1e9:.2f}B", tokens_per_step=tokens, step_s=step_s,
           tokens_per_s=tokens / step_s, tflops_6pt=six_pt / step_s / 1e12, tflops_model=model / step_s / 1e12,
           mfu=None if peak is None else model / step_s / 1e12 / peak,
           compute_busy=summary.get("compute_busy"), copy_hidden=summary.get("copy_hidden"),
           device_peak_bytes=history[-1]["device_peak_bytes"], host_peak_bytes=history[-1]["host_peak_bytes"],
           kernels=engine.kernel_backend, stream_in_gb_per_s=_stream_in_bandwidth(engine, events),
           plain_copy_gb_per_s=copy_gbps(max(engine.store.working, key=torch.Tensor.numel), device))
    engine.close()


def _stream_in_bandwidth(engine, events) -> float:
    """Bytes over busy time of the copy-in spans of the engine's own trace."""
    size = {layout.name: layout.numel * engine.store.compute_dtype.itemsize for layout in engine.store.layouts}
    p = engine.pipeline
    for u in p.head_chunks():   # the head streams in vocabulary chunks (rows and the final norm)
        size[p.name(u)] = (u.stop - u.start + 1) * p.cfg.hidden_size * engine.store.compute_dtype.itemsize
    spans = [e for e in events["traceEvents"] if e["ph"] == "X" and e["name"].startswith("stream_in ")
             and e["name"] != "stream_in embed rows"]   # a gather of the step's rows, not a weight stream
    total = sum(size[e["name"].split(" ", 1)[1]] for e in spans)
    return total / (sum(e["dur"] for e in spans) / 1e6) / 1e9

"""How far to trust ht.plan: its predictions against a measured run of the same model and step, side by side.

CPU (no GPU): a ~200M-parameter model (H=1024, I=2816, 12 layers, vocab 32000) on the CPU device, two micro-batches
of 256 tokens a step, planned with hardware="cpu". GPU: a Llama-3.2-1B-shaped model (an 8B one where host RAM
allows) at 16K tokens a step, planned with the card's own figures. Recorded: predicted and measured step time (the
wall time of fit() over the timed steps, the AdamW of the last one included), device peak and bus bytes, and the
ratios predicted / measured. On CPU also the process's CPU time per step over its threads, the fairer yardstick
on a shared box.
"""
import os
import resource
import time

import pytest
import torch

import horizon_triton as ht
from horizon_triton.planning.plan import plan

GPU_FIGURES = {"H100": "h100", "H200": "h200", "GH200": "gh200", "A100": "a100"}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _workload(device):
    if device.type == "cuda":
        total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cfg = ht.preset("llama-8b" if total_ram > 16 * 8.1e9 * 1.3 else "llama-1b")
        name = torch.cuda.get_device_name()
        hardware = next((v for k, v in sorted(GPU_FIGURES.items(), key=lambda kv: -len(kv[0])) if k in name), "h100")
        return cfg, 4, 4096, 1, hardware
    cfg = ht.ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16,
                         num_kv_heads=4)
    return cfg, 1, 256, 2, "cpu"


@pytest.mark.benchmark(group="plan")
def test_plan_against_a_measured_step(benchmark, record, device):
    cfg, rows, seq, accum, hardware = _workload(device)
    train_cfg = ht.TrainConfig(device=device.type, lr=1e-5, grad_accum_steps=accum)
    predicted = plan(cfg, train_cfg, tokens_per_step=rows * seq * accum, seq_len=seq, hardware=hardware,
                     find_hiding=False)
    engine = ht.Engine(cfg, train_cfg)
    # the dry run's ids: every token of the step a distinct id (as many embedding rows as a step can gather)
    ids = torch.arange(accum * rows * seq).view(accum, rows, seq) % cfg.vocab_size
    batches = [{"input_ids": ids[m], "labels": ids[m]} for m in range(accum)]
    engine.fit(batches)                                         # warm-up: kernels, pinned pools, the AdamW build
    steps, seconds, cpu_seconds, history = 2, [], [], []

    def timed():
        start, cpu = time.perf_counter(), _cpu_seconds()
        history.extend(engine.fit(batches * steps))
        seconds.append((time.perf_counter() - start) / steps)
        cpu_seconds.append((_cpu_seconds() - cpu) / steps)
    benchmark.pedantic(timed, rounds=1, iterations=1)
    measured = min(seconds)
    # on a shared, oversubscribed CPU box the wall time is mostly waiting for a core: the process's CPU time over
    # its threads is what the step would take with the cores to itself
    cpu_measured = cpu_seconds[0] / torch.get_num_threads() if device.type == "cpu" else None
    last = history[-1]
    device_measured = last.get("device_allocator_peak_bytes", last["device_peak_bytes"])
    device_predicted = predicted["device_peak_bytes"] if "device_allocator_peak_bytes" in last \
        else predicted["device_held_peak_bytes"]
    record(model=f"{cfg.num_parameters() / 1e9:.2f}B", hardware=hardware, tokens_per_step=rows * seq * accum,
           step_s_measured=measured, step_s_predicted=predicted["step_time_s"],
           step_time_ratio=predicted["step_time_s"] / measured, busy_s_predicted=predicted["busy_s"],
           cpu_time_s_per_thread=cpu_measured, load_average=os.getloadavg()[0],
           step_time_ratio_to_cpu_time=None if cpu_measured is None else predicted["step_time_s"] / cpu_measured,
           device_bytes_measured=device_measured, device_bytes_predicted=device_predicted,
           device_bytes_ratio=device_predicted / device_measured,
           h2d_ratio=predicted["h2d_bytes_per_step"] / last["h2d_bytes"],
           d2h_ratio=predicted["d2h_bytes_per_step"] / last["d2h_bytes"])
    engine.close()

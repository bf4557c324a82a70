"""LoRA on a frozen base against the full fine-tune of the same model, side by side in one run: step time, host
store bytes per base parameter, bus bytes per step.

A LoRA step skips every weight-gradient GEMM of the base (a third of the decoder's matmul work), the embedding and
head gradients and their copies out, and the CPU AdamW of the base; it adds the adapters' rank-r products. On a
GPU the workload is Llama-3.2-1B-shaped (16K tokens a step); on CPU a small Llama (4 layers of hidden 512, 2K
tokens a step), where the figures show the relative cost of the paths on the torch references.
"""
import time

import pytest
import torch

import horizon_triton as ht


def _workload(device):
    if device.type == "cuda":
        return ht.preset("llama-1b"), 4, 4096
    return ht.ModelConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                          num_kv_heads=2), 4, 512


@pytest.mark.benchmark(group="lora-step")
def test_lora_step_against_full_finetune(benchmark, record, device):
    cfg, batch, seq = _workload(device)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    batches = [{"input_ids": ids, "labels": ids}]
    engines = {"full": ht.Engine(cfg, ht.TrainConfig(device=device.type, lr=1e-5)),
               "lora": ht.Engine(cfg, ht.TrainConfig(device=device.type, lr=1e-4, lora_rank=16, lora_alpha=32))}
    times = {name: [] for name in engines}
    last = {}
    for engine in engines.values():
        engine.fit(batches)                              # warm-up
    for _ in range(4):                                   # interleaved: both see the same machine load
        for name, engine in engines.items():
            start = time.perf_counter()
            last[name] = engine.fit(batches)[-1]
            engine.optimizer.wait_all()                  # the step's AdamW counted in the step it belongs to
            times[name].append(time.perf_counter() - start)
    benchmark.pedantic(lambda: engines["lora"].fit(batches), rounds=2, iterations=1)
    P = cfg.num_parameters()
    # step_s: forward, backward and the step's CPU AdamW (waited for), the fastest of 4 interleaved rounds
    record(model=f"{P / 1e6:.1f}M", tokens_per_step=batch * seq, full_step_s=min(times["full"]),
           lora_step_s=min(times["lora"]), lora_over_full=min(times["lora"]) / min(times["full"]),
           full_host_bytes_per_param=engines["full"].store.nbytes() / P,
           lora_host_bytes_per_param=engines["lora"].store.nbytes() / P,
           full_d2h_bytes=last["full"]["d2h_bytes"], lora_d2h_bytes=last["lora"]["d2h_bytes"],
           full_device_peak_bytes=last["full"]["device_peak_bytes"],
           lora_device_peak_bytes=last["lora"]["device_peak_bytes"])
    for engine in engines.values():
        engine.close()

"""DPO: the reference pass against a training step, and the preference accuracy curve of the addition pairs.

- reference pass: Engine.reference_logps over one optimizer step's batches (forward only, layers streamed through
  one slot, the head's statistics pass) against one DPO step and one mean-loss step on the same batches, timed
  side by side in one process. A forward-only pass costs about a third of a step (forward + recompute +
  backward ≈ 4 forwards of GEMM work) plus its unpipelined copies.
- accuracy: the demo's model, fine-tuned on sums for 60 steps, then DPO on (right sum, one digit wrong) pairs;
  the held-out pairs' reward accuracy and DPO loss every 25 steps (tests/test_dpo.py checks the end points).

On a GPU a Llama-3.2-1B-shaped model, 4 x 2048 tokens a step; on CPU a 4-layer 512-wide one, 4 x 256.
"""
import sys
import time
from pathlib import Path

import pytest
import torch

import horizon_triton as ht
from horizon_triton import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_dpo import addition_dpo_setup  # noqa: E402  (the test's own setup: the same run)


def _workload(device):
    if device.type == "cuda":
        return ht.preset("llama-1b"), 4, 2048
    return ht.ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                          num_kv_heads=4), 4, 256


@pytest.mark.benchmark(group="dpo")
def test_reference_pass_against_a_training_step(benchmark, record, device):
    cfg, rows, seq = _workload(device)
    ids = torch.randint(0, cfg.vocab_size, (rows, seq))
    labels = ids.clone()
    labels[:, :seq // 4] = -100                              # a prompt, then the response
    batch = {"input_ids": ids, "labels": labels}
    engine = ht.Engine(cfg, ht.TrainConfig(device=device.type, lr=1e-6, objective="dpo"))
    sft = ht.Engine(cfg, ht.TrainConfig(device=device.type, lr=1e-6))
    [ref] = list(engine.reference_logps([batch]))           # warm-up: kernels, pinned pools
    dpo_batch = dict(batch, ref_logps=ref)
    engine.fit([dpo_batch])
    sft.fit([batch])
    engine.optimizer.wait_all()
    sft.optimizer.wait_all()
    times = {"reference": [], "dpo_step": [], "sft_step": []}

    def step(e, b) -> float:
        seconds = e.fit([b])[0]["time_s"]
        e.optimizer.wait_all()             # its CPU AdamW must not run under the next measurement
        return seconds

    def one_round():                       # the three interleaved: the same load on each
        start = time.perf_counter()
        list(engine.reference_logps([batch]))
        times["reference"].append(time.perf_counter() - start)
        times["dpo_step"].append(step(engine, dpo_batch))
        times["sft_step"].append(step(sft, batch))
    benchmark.pedantic(one_round, rounds=5, iterations=1)
    best = {k: min(v) for k, v in times.items()}
    record(model=f"{cfg.num_parameters() / 1e6:.0f}M", tokens=rows * seq, **{f"{k}_s": v for k, v in best.items()},
           reference_over_dpo_step=best["reference"] / best["dpo_step"],
           dpo_over_sft_step=best["dpo_step"] / best["sft_step"])
    engine.close()
    sft.close()


@pytest.mark.benchmark(group="dpo")
def test_addition_preference_accuracy_curve(benchmark, record, tmp_path):
    engine, rows, held = addition_dpo_setup(tmp_path)
    loader = iter(data.RowLoader(rows, 32, steps=200))
    curve = []

    def evaluate():
        scores = engine.evaluate_preferences(data.RowLoader(held, 64, epochs=1, shuffle=False))
        curve.append((engine.step, round(scores["rewards/accuracies"], 3), round(scores["loss"], 4)))

    def run():
        evaluate()
        for _ in range(8):
            engine.fit(loader, max_steps=25)
            evaluate()
    benchmark.pedantic(run, rounds=1, iterations=1)
    record(curve_step_accuracy_loss=curve)

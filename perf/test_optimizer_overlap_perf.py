"""How much of the next step's forward waits for the CPU AdamW (the bubble between optimizer and forward).

The optimizer updates layers 0, 1, 2, … on its thread while the next forward streams them in; layer i's forward
can start only once layer i is updated. With a per-layer forward compute c_i and a per-layer update u_i the
forward can finish no earlier than

    bound = max_i (u_0 + … + u_i  +  c_i + … + c_last)

(layer i waits for every update before it, then the layers from i on still have to compute). This benchmark
emulates a GPU step on the async test device with fixed times (a sleep inside the compute work and inside each
layer's update, proportional to its size), so the figure is the scheduler's, independent of this machine's speed:
``bubble_s`` = the time from the start of step 2 to the start of its head compute, less the same for step 1
(which has no update before it): how long the forward waited for the CPU AdamW, against the bound's excess over
the plain forward, ``bound_excess_s``: a ratio near 1 means nothing is left to gain by ordering, only by a faster
AdamW (the host-side overhead of the tiny model's layers overlaps the wait, so the ratio can fall below 1).

Emulated ratios (Llama-3-8B at 32K tokens on an H100 with a 16-core AdamW): decoder forward 25 ms, decoder
update 60 ms (218 M parameters), embedding and head updates 2.4× a decoder's (525 M parameters); and a
compute-bound case with 10 ms decoder updates.
"""
import time

import pytest
import torch

import horizon_triton as ht
from horizon_triton import engine as engine_module
from horizon_triton.models.dense import layer as lt
from horizon_triton.host import optimizer as opt

FORWARD_S = 0.025
LAYERS = 6


def _bound(updates: list[float], computes: list[float]) -> float:
    return max(sum(updates[:i + 1]) + sum(computes[i:]) for i in range(len(updates)))


@pytest.mark.benchmark(group="optimizer-overlap")
@pytest.mark.parametrize("decoder_update_s", [0.060, 0.010], ids=["adamw-bound", "compute-bound"])
def test_forward_waiting_for_the_cpu_adamw(benchmark, record, monkeypatch, decoder_update_s):
    cfg = ht.preset("tiny", num_layers=LAYERS)
    update, forward = opt.OptimizerDriver.update_layer, lt.decoder_forward
    embed_update_s = 2.4 * decoder_update_s
    update_s = [embed_update_s] + [decoder_update_s] * LAYERS + [embed_update_s]

    def timed_update(self, i, *args):
        time.sleep(update_s[i])
        update(self, i, *args)

    def timed_forward(*args):
        time.sleep(FORWARD_S)
        return forward(*args)

    marks = []                    # (run_step start, head compute start) per step

    def timed_run_step(*args, **kwargs):
        marks.append([time.perf_counter(), None])
        return run_step(*args, **kwargs)

    def timed_head(*args, **kwargs):
        if marks[-1][1] is None:
            marks[-1][1] = time.perf_counter()
        return head(*args, **kwargs)

    run_step, head = engine_module.run_step, lt.head_forward_backward
    monkeypatch.setattr(opt.OptimizerDriver, "update_layer", timed_update)
    monkeypatch.setattr(lt, "decoder_forward", timed_forward)
    monkeypatch.setattr(engine_module, "run_step", timed_run_step)
    monkeypatch.setattr(lt, "head_forward_backward", timed_head)
    forwards = []

    def run():
        marks.clear()
        engine = ht.Engine(cfg, ht.TrainConfig(device="cpu-async", lr=1e-3))
        ids = torch.randint(0, cfg.vocab_size, (2, 16))
        engine.fit([{"input_ids": ids, "labels": ids}] * 2)
        engine.close()
        forwards.append([h - s for s, h in marks])

    benchmark.pedantic(run, rounds=3, iterations=1)
    first, second = (min(f[k] for f in forwards) for k in (0, 1))
    # the forward's compute: embedding and head ~0, decoders FORWARD_S each
    computes = [0.0] + [FORWARD_S] * LAYERS + [0.0]
    bound_excess = _bound(update_s, computes) - sum(computes)
    record(layers=LAYERS, forward_s=FORWARD_S, decoder_update_s=decoder_update_s,
           forward_to_head_step1_s=first, forward_to_head_step2_s=second, bubble_s=second - first,
           optimizer_total_s=sum(update_s), bound_excess_s=bound_excess,
           bubble_over_bound=(second - first) / bound_excess)

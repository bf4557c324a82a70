"""CPU AdamW step on 64M parameters: kernels/cpu_adam.py against what one would write otherwise.

    (a) adamw_step_: bf16 grads in, fp32 master and moments updated, bf16 weights out, one pass;
    (b) torch: p.grad = grad.float().mul_(scale); torch.optim.AdamW(fused=True).step(); weights.copy_(p);
    (c) DeepSpeedCPUAdam with the same casts around it (skipped where deepspeed is not installed or its
        CPUAdam op does not build; it is not a project dependency: pip install deepspeed to run it);
    (d) a plain copy of 14 bytes/param into another 14 bytes/param: the memory roofline;
    (e) the three layouts of the host store and torch's fused AdamW, interleaved round by round in one test
        (test_layouts_interleaved): fp32 master + bf16 out (a), split master (adamw_step_split_: 26 B/param
        moved), split master + 8-bit moments (adamw_step_split_8bit_: 14 B/param), torch fused (b).

Every case is reported as params/s and as effective bandwidth over the 28 bytes/param that the step must move
(read master 4, grad 2, exp_avg 4, exp_avg_sq 4; write master, exp_avg, exp_avg_sq, bf16 weights), whatever it
really moves, so the GB/s figures compare like with like; ratio_to_copy divides that by the copy's GB/s.
Times are the minimum over the rounds: on a shared machine the minimum is the least disturbed figure.

    pytest perf/test_cpu_adam_perf.py --benchmark-only
"""
import time

import pytest
import torch
from bench import ADAMW_BYTES_PER_PARAM as BYTES_PER_PARAM
from bench import ADAMW_GRAD_SCALE as GRAD_SCALE
from bench import ADAMW_HYPER as HYPER

from horizon_triton.kernels import cpu_adam

N = 64 * 2**20                 # parameters
ROUNDS = 12


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    """Copy bandwidth (read + write bytes / s), measured once for the ratios."""
    src = torch.ones(N * BYTES_PER_PARAM // 2, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best / 1e9


def _record_throughput(benchmark, record, copy_gbps, **extra):
    seconds = benchmark.stats.stats.min
    gbps = N * BYTES_PER_PARAM / seconds / 1e9
    record(params=N, bytes_per_param=BYTES_PER_PARAM, params_per_s=N / seconds, effective_GBps=round(gbps, 2),
           copy_GBps=round(copy_gbps, 2), ratio_to_copy=round(gbps / copy_gbps, 3),
           torch_threads=torch.get_num_threads(), **extra)


def _state():
    """(master fp32, grad bf16, bf16 weights) for the torch-optimizer cases."""
    master = torch.nn.Parameter(torch.randn(N))
    return master, (torch.randn(N) * 1e-3).bfloat16(), torch.empty(N, dtype=torch.bfloat16)


def test_adamw_step_(benchmark, record, copy_gbps):
    master, grad = torch.randn(N), (torch.randn(N) * 1e-3).bfloat16()
    exp_avg, exp_avg_sq = torch.zeros(N), torch.zeros(N)
    weights = torch.empty(N, dtype=torch.bfloat16)
    step = iter(range(1, 10**6))

    def run():
        cpu_adam.adamw_step_(master, grad, exp_avg, exp_avg_sq, weights, step=next(step), **HYPER,
                             grad_scale=GRAD_SCALE)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    _record_throughput(benchmark, record, copy_gbps, implementation=cpu_adam.implementation(), grad="bf16")


def _torch_step_with_casts(optimizer, master, grad, weights):
    """What the engine would do around a stock optimizer: upcast and scale the grad, step, downcast."""
    master.grad = grad.float().mul_(GRAD_SCALE)
    optimizer.step()
    weights.copy_(master.detach())


def test_torch_fused_adamw(benchmark, record, copy_gbps):
    master, grad, weights = _state()
    optimizer = torch.optim.AdamW([master], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                                  eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], fused=True)
    benchmark.pedantic(_torch_step_with_casts, args=(optimizer, master, grad, weights), rounds=ROUNDS,
                       warmup_rounds=1)
    _record_throughput(benchmark, record, copy_gbps, implementation="torch.optim.AdamW(fused=True) + casts")


def test_deepspeed_cpu_adam(benchmark, record, copy_gbps):
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as exc:     # not installed, or its import fails on this machine
        pytest.skip(f"deepspeed not importable ({type(exc).__name__}: {exc}); pip install deepspeed to compare")
    master, grad, weights = _state()
    try:
        optimizer = DeepSpeedCPUAdam([master], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                                     eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], adamw_mode=True)
    except Exception as exc:     # its CPUAdam op is JIT-built with ninja and a compiler
        pytest.skip(f"DeepSpeedCPUAdam did not build ({type(exc).__name__}: {exc})")
    benchmark.pedantic(_torch_step_with_casts, args=(optimizer, master, grad, weights), rounds=ROUNDS,
                       warmup_rounds=1)
    _record_throughput(benchmark, record, copy_gbps, implementation="DeepSpeedCPUAdam + casts")


def test_memory_copy_roofline(benchmark, record, copy_gbps):
    src = torch.ones(N * BYTES_PER_PARAM // 2, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    benchmark.pedantic(dst.copy_, args=(src,), rounds=ROUNDS, warmup_rounds=1)
    _record_throughput(benchmark, record, copy_gbps, implementation="torch copy_ of 14 B/param")


def test_layouts_interleaved(benchmark, record):
    """(e): each round runs every layout once, in turn, so that the machine's load falls on all of them alike;
    the minimum over rounds of each is recorded with its params/s and its ratio to the fp32 layout (today's)."""
    from horizon_triton.kernels.host_formats import num_blocks, split_master
    master, grad = torch.randn(N), (torch.randn(N) * 1e-3).bfloat16()
    fp32 = [master, grad, torch.zeros(N), torch.zeros(N), torch.empty(N, dtype=torch.bfloat16)]
    halves = [torch.empty(N, dtype=torch.bfloat16), torch.empty(N, dtype=torch.int16)]
    split_master(master, *halves)
    split = [*halves, grad, torch.zeros(N), torch.zeros(N)]
    eight_halves = [h.clone() for h in halves]
    blocks = num_blocks(N)
    eight = [*eight_halves, grad, torch.zeros(N, dtype=torch.uint8), torch.zeros(blocks),
             torch.zeros(N, dtype=torch.uint8), torch.zeros(blocks)]
    fused_master, _, fused_weights = _state()
    fused = torch.optim.AdamW([fused_master], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                              eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], fused=True)
    step = iter(range(1, 10**6))
    cases = {
        "fp32 master (adamw_step_)": lambda t: cpu_adam.adamw_step_(*fp32, step=t, **HYPER, grad_scale=GRAD_SCALE),
        "split master (adamw_step_split_)": lambda t: cpu_adam.adamw_step_split_(*split, step=t, **HYPER,
                                                                                  grad_scale=GRAD_SCALE),
        "split + 8-bit (adamw_step_split_8bit_)": lambda t: cpu_adam.adamw_step_split_8bit_(
            *eight, step=t, **HYPER, grad_scale=GRAD_SCALE),
        "torch AdamW(fused=True) + casts": lambda t: _torch_step_with_casts(fused, fused_master, grad,
                                                                            fused_weights),
    }
    best = {name: float("inf") for name in cases}

    def one_round():
        t = next(step)
        for name, run in cases.items():
            start = time.perf_counter()
            run(t)
            best[name] = min(best[name], time.perf_counter() - start)
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
    today = best["fp32 master (adamw_step_)"]
    record(params=N, implementation=cpu_adam.implementation(), threads=cpu_adam.get_num_threads(),
           **{f"{name} ms": round(1e3 * t, 2) for name, t in best.items()},
           **{f"{name} params/s": round(N / t) for name, t in best.items()},
           **{f"{name} speed vs fp32 master": round(today / t, 3) for name, t in best.items()})

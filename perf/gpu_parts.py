"""The measuring parts of the GPU check (perf/gpu_check.py runs each in a child process of its own).

    python perf/gpu_parts.py PART --result FILE [--quick]

runs one part and writes FILE: {"status": "ok", "summary": str, "figures": {...}, "rows": [...]} or
{"status": "skipped", "reason": str}; an exception leaves no FILE and a traceback on stderr (the driver reports
it). ``--quick`` shrinks every shape (a smoke test; on CPU only the cpu_adam part runs at all).

Timings on the GPU are medians of CUDA events (tuning.time_ms, i.e. triton.testing.do_bench) after a warm-up call
that compiles. FLOP formulas are stated next to each figure; bf16 everywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from bench import (ADAMW_BYTES_PER_PARAM, ADAMW_GRAD_SCALE, ADAMW_HYPER, STEP_FLOP_FORMULAS, attention_inputs,
                   autograd_cross_entropy, cross_entropy_inputs, cuda_peak_extra_bytes, engine_flops, peak_tflops,
                   plain_matmuls, rmsnorm_matmul_inputs, sdpa_inputs, two_gemms_backward)

GiB = 2 ** 30
BF16 = torch.bfloat16
# the kernel benchmarks' shapes, {quick: shapes} (perf/warm_cache.py compiles the same launches ahead)
ATTENTION_SHAPES = {True: [dict(B=1, S=1024, Hq=8, Hkv=2, D=128)],
                    False: [dict(B=4, S=4096, Hq=32, Hkv=8, D=128), dict(B=2, S=8192, Hq=32, Hkv=8, D=128)]}
RMSNORM_MATMUL_TOKENS = {True: 1024, False: 16384}
RMSNORM_MATMUL_PROJECTIONS = {True: [("qkv", 512, 768)],
                              False: [("8B qkv", 4096, 6144), ("8B gate_up", 4096, 28672),
                                      ("70B qkv", 8192, 10240), ("70B gate_up", 8192, 57344)]}
CROSS_ENTROPY_SHAPES = {True: [(1024, 512, 8192)], False: [(16384, 4096, 128256), (16384, 8192, 152064)]}
CROSS_ENTROPY_CHUNK = 4096                     # the chunk the engine's head uses


class Skipped(Exception):
    """The part cannot run here; the message says why."""


def _cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise Skipped(f"no CUDA GPU visible (torch {torch.__version__}: torch.cuda.is_available() is False)")
    return torch.device("cuda")


def _ms(fn) -> float:
    from horizon_triton.kernels import tuning
    fn()                                   # compile, autotune lookup, cuBLAS heuristics
    return tuning.time_ms(fn)


def _tflops(flops: float, ms: float) -> float:
    return _sig(flops / ms / 1e9)


def _sig(x: float) -> float:
    """Four significant digits."""
    return float(f"{x:.4g}")


def _free():
    torch.cuda.synchronize()  # sync: let the allocator release the last shape's tensors before the next
    torch.cuda.empty_cache()


# ---- (b) each kernel against the library ---------------------------------------------------------------------
def attention(quick: bool) -> dict:
    """Triton flash attention vs torch SDPA (flash and cuDNN backends), forward and backward, causal GQA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from horizon_triton.kernels.attention import attention_backward, attention_flops, attention_forward
    dev = _cuda()
    rows = []
    for shape in ATTENTION_SHAPES[quick]:
        q, k, v, do = attention_inputs(dev, **shape, dtype=BF16)
        scale = shape["D"] ** -0.5
        fwd_flops = attention_flops(shape["B"], shape["S"], shape["Hq"], shape["D"])
        bwd_flops = attention_flops(shape["B"], shape["S"], shape["Hq"], shape["D"], backward=True)
        o, lse = attention_forward(q, k, v, None, scale)
        row = dict(shape=shape, triton_fwd_ms=_ms(lambda: attention_forward(q, k, v, None, scale)),
                   triton_bwd_ms=_ms(lambda: attention_backward(do, q, k, v, o, lse, None, scale)))
        qs, ks, vs = sdpa_inputs(q, k, v)
        do_s = do.transpose(1, 2)
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    row[f"sdpa_{name}_fwd_ms"] = _ms(
                        lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
                    qg, kg, vg = (t.detach().requires_grad_() for t in (qs, ks, vs))
                    og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
                    row[f"sdpa_{name}_bwd_ms"] = _ms(
                        lambda: torch.autograd.grad(og, (qg, kg, vg), do_s, retain_graph=True))
                    row[f"max_abs_diff_vs_sdpa_{name}"] = (o - og.detach().transpose(1, 2)).abs().max().item()
                    del qg, kg, vg, og
            except RuntimeError as exc:          # a backend that does not take this shape or GPU
                row[f"sdpa_{name}"] = f"unavailable: {str(exc).splitlines()[0][:160]}"
        for key in [k for k in row if k.endswith("fwd_ms")]:
            row[key.replace("_ms", "_tflops")] = _tflops(fwd_flops, row[key])
        for key in [k for k in row if k.endswith("bwd_ms")]:
            row[key.replace("_ms", "_tflops")] = _tflops(bwd_flops, row[key])
        rows.append(row)
        del q, k, v, do, o, lse, qs, ks, vs, do_s
        _free()
    head = rows[0]
    best = {d: max(head.get(f"sdpa_{n}_{d}_tflops", 0) for n in ("flash", "cudnn")) for d in ("fwd", "bwd")}
    return dict(summary=f"S={head['shape']['S']}: fwd {head['triton_fwd_tflops']} TFLOPS (best SDPA {best['fwd']}), "
                        f"bwd {head['triton_bwd_tflops']} (best SDPA {best['bwd']})",
                figures=dict(flop_formula="forward 2·B·Hq·S²·D (causal: half of QKᵀ and PV); backward 2.5×",
                             sdpa_note="SDPA gets k/v repeated onto the query heads beforehand (untimed, same "
                                       "FLOPs); its backward is autograd.grad on a kept graph",
                             targets="H100: forward ≥ 450 TFLOPS, backward ≥ 300"),
                rows=rows)


def rmsnorm_matmul(quick: bool) -> dict:
    """The fused RMSNorm + matmul vs cuBLAS on the pre-normalized input, forward and backward."""
    from horizon_triton.kernels import rmsnorm_matmul as rm
    from horizon_triton.kernels.reference import rmsnorm_forward
    dev, eps, T = _cuda(), 1e-5, RMSNORM_MATMUL_TOKENS[quick]
    rows = []
    for name, H, N in RMSNORM_MATMUL_PROJECTIONS[quick]:
        x, g, w, dy = rmsnorm_matmul_inputs(dev, T, H, N, BF16)
        xn, _ = rmsnorm_forward(x, g, eps)
        y, rstd = rm.rmsnorm_matmul_forward(x, g, w, eps)
        d_w = torch.zeros(w.shape, device=dev, dtype=torch.float32)
        d_g = torch.zeros(g.shape, device=dev, dtype=torch.float32)
        row = dict(projection=name, T=T, H=H, N=N, ran=rm.implementations(T, N, H, BF16),
                   fused_fwd_ms=_ms(lambda: rm.rmsnorm_matmul_forward(x, g, w, eps)),
                   cublas_fwd_ms=_ms(lambda: xn @ w.t()),
                   fused_bwd_ms=_ms(lambda: rm.rmsnorm_matmul_backward(dy, x, g, w, rstd, d_w, d_g)),
                   cublas_bwd_ms=_ms(lambda: two_gemms_backward(dy, w, xn, d_w)),
                   max_abs_diff_fwd_vs_cublas=(y - xn @ w.t()).abs().max().item())
        for kind, flops in (("fwd", 2 * T * N * H), ("bwd", 4 * T * N * H)):
            row[f"fused_{kind}_tflops"] = _tflops(flops, row[f"fused_{kind}_ms"])
            row[f"cublas_{kind}_tflops"] = _tflops(flops, row[f"cublas_{kind}_ms"])
            row[f"{kind}_ratio_to_cublas"] = round(row[f"fused_{kind}_ms"] / row[f"cublas_{kind}_ms"], 3)
        rows.append(row)
        del x, g, w, dy, xn, y, rstd, d_w, d_g
        _free()
    fwd, bwd = ([r[f"{kind}_ratio_to_cublas"] for r in rows] for kind in ("fwd", "bwd"))
    return dict(summary=f"time / cuBLAS: fwd {min(fwd)}–{max(fwd)}, bwd {min(bwd)}–{max(bwd)}",
                figures=dict(flop_formula="forward 2·T·N·H; backward 4·T·N·H (dx and dW GEMMs)",
                             cublas_note="cuBLAS runs on an input normalized beforehand (untimed): the floor; "
                                         "its backward is dx = dy·W and dW += dyᵀ·x̂ (bf16 GEMM added to fp32)",
                             target="ratio_to_cublas ≤ 1"),
                rows=rows)


def cross_entropy(quick: bool) -> dict:
    """The fused linear cross-entropy vs its three plain GEMMs and vs the autograd path: ms and peak memory."""
    from horizon_triton.kernels import cross_entropy as ce
    from horizon_triton.kernels import tuning
    dev, chunk = _cuda(), CROSS_ENTROPY_CHUNK
    rows = []
    for T, H, V in CROSS_ENTROPY_SHAPES[quick]:
        h, weight, targets, d_weight = cross_entropy_inputs(dev, T, H, V, BF16)
        config = tuning.best_config(ce.KERNEL, ce.shape_key(BF16, H, V, chunk), ce.default_config(BF16))
        fused = lambda: ce.linear_cross_entropy(h, weight, targets, d_weight, 1.0 / T, chunk)  # noqa: E731
        logits = torch.empty(T, V, device=dev, dtype=BF16)
        row = dict(T=T, H=H, V=V, chunk=chunk, config=config,
                   error_over_allowed=round(ce.check_error(config, H, V, dev), 3),
                   fused_ms=_ms(fused), fused_peak_extra_GiB=cuda_peak_extra_bytes(fused) / GiB,
                   matmuls_ms=_ms(lambda: plain_matmuls(h, weight, logits)))
        del logits
        _free()
        row["matmuls_peak_extra_GiB"] = cuda_peak_extra_bytes(
            lambda: plain_matmuls(h, weight, torch.empty(T, V, device=dev, dtype=BF16))) / GiB
        hg, wg = h.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        autograd = lambda: autograd_cross_entropy(hg, wg, targets, d_weight)  # noqa: E731
        row.update(autograd_ms=_ms(autograd), autograd_peak_extra_GiB=cuda_peak_extra_bytes(autograd) / GiB)
        for key in ("fused", "matmuls", "autograd"):
            row[f"{key}_tflops"] = _tflops(6 * T * H * V, row[f"{key}_ms"])
            row[f"{key}_peak_extra_GiB"] = round(row[f"{key}_peak_extra_GiB"], 3)
        row["ratio_to_matmuls"] = round(row["fused_ms"] / row["matmuls_ms"], 3)
        rows.append(row)
        del h, weight, targets, d_weight, hg, wg
        _free()
    return dict(summary="; ".join(f"H={r['H']} V={r['V']}: {r['ratio_to_matmuls']}× the GEMMs, "
                                  f"{r['fused_peak_extra_GiB']} vs {r['autograd_peak_extra_GiB']} GiB autograd"
                                  + (f" (WRONG: error {r['error_over_allowed']}× the allowed)"
                                     if not r["error_over_allowed"] <= 1 else "") for r in rows),
                figures=dict(flop_formula="6·T·H·V (logits, dh, dW GEMMs)",
                             memory_note="peak_extra: the allocator's high-water mark above the inputs",
                             target="fused ≤ 1.2× the plain GEMMs; error_over_allowed ≤ 1"),
                rows=rows)


# ---- (c) host -> device bandwidth ----------------------------------------------------------------------------
def host_to_device(quick: bool) -> dict:
    """The scheduler's stream_in (pinned store → staging slot on the copy-in stream) against a plain pinned copy
    of the same bytes, a pageable copy, and a plain device → host copy into pinned memory."""
    import horizon_triton as ht
    from horizon_triton.devices.device import CudaDevice
    from horizon_triton.schedule.pipeline import Unit, build_pipeline
    from horizon_triton.schedule.scheduler import stream_in
    from horizon_triton.host.store import HostStore
    _cuda()
    cfg = (ht.preset("tiny", hidden_size=512, intermediate_size=1536, num_heads=4) if quick else
           ht.preset("llama-8b", num_layers=1, vocab_size=256))        # one 8B decoder layer: 218 M params
    store = HostStore(cfg, BF16, pin=True)
    dev = CudaDevice()
    no_optimizer = SimpleNamespace(wait_layer=lambda i: None)      # weights are current: nothing to wait for
    p = build_pipeline(cfg, store, None, dev, no_optimizer, num_slots=2)
    layer = 1
    nbytes = store.working[layer].numel() * store.working[layer].element_size()
    repeats = 5 if quick else 20

    def wall_gbps(fn) -> float:
        fn()
        torch.cuda.synchronize()  # sync: time only the copies below
        start = time.perf_counter()
        for r in range(repeats):
            fn(r)
        torch.cuda.synchronize()  # sync: the copies have landed
        return round(repeats * nbytes / (time.perf_counter() - start) / 1e9, 2)

    slot_view = p.slots[0][:store.working[layer].numel()]
    pageable = store.working[layer].clone()
    to_host = torch.empty_like(store.working[layer], pin_memory=True)
    figures = dict(bytes_per_copy=nbytes, repeats=repeats, layer=store.layouts[layer].name,
                   stream_in_GBps=wall_gbps(lambda r=0: stream_in(p, Unit(layer), r % 2)),
                   plain_pinned_GBps=wall_gbps(lambda r=0: slot_view.copy_(store.working[layer], non_blocking=True)),
                   plain_pageable_GBps=wall_gbps(lambda r=0: slot_view.copy_(pageable, non_blocking=True)),
                   device_to_pinned_host_GBps=wall_gbps(lambda r=0: to_host.copy_(slot_view, non_blocking=True)),
                   method="wall clock over the repeats, synchronized before and after")
    figures["stream_in_over_plain"] = round(figures["stream_in_GBps"] / figures["plain_pinned_GBps"], 3)
    return dict(summary=f"stream_in {figures['stream_in_GBps']} GB/s vs plain pinned {figures['plain_pinned_GBps']}"
                        f" (pageable {figures['plain_pageable_GBps']}, d→h {figures['device_to_pinned_host_GBps']})",
                figures=figures)


# ---- (d) the CPU AdamW -------------------------------------------------------------------------------------
def cpu_adam(quick: bool) -> dict:
    """kernels/cpu_adam.py adamw_step_ on this machine's cores, against a plain copy of the same bytes."""
    from horizon_triton.kernels import cpu_adam as ca
    n = 2 ** 21 if quick else 2 ** 27
    rounds = 3 if quick else 6
    # constant fills (multi-threaded, unlike randn): the loop's speed does not depend on the values
    master, grad = torch.full((n,), 0.01), torch.full((n,), 1e-3, dtype=BF16)
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    weights = torch.empty(n, dtype=BF16)
    times = []
    for step in range(1, rounds + 2):                 # the first call builds / loads the C++ loop: not timed
        start = time.perf_counter()
        ca.adamw_step_(master, grad, exp_avg, exp_avg_sq, weights, step=step, **ADAMW_HYPER,
                       grad_scale=ADAMW_GRAD_SCALE)
        times.append(time.perf_counter() - start)
    best, median = min(times[1:]), statistics.median(times[1:])
    src = torch.ones(n * ADAMW_BYTES_PER_PARAM // 2, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    copy_times = []
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        copy_times.append(time.perf_counter() - start)
    copy_gbps = 2 * src.numel() / min(copy_times) / 1e9
    gbps = n * ADAMW_BYTES_PER_PARAM / best / 1e9
    figures = dict(params=n, rounds=rounds, implementation=ca.implementation(), cpu_count=os.cpu_count(),
                   best_ms=_sig(best * 1e3), median_ms=_sig(median * 1e3),
                   params_per_s=float(f"{n / best:.4g}"), effective_GBps=round(gbps, 2),
                   copy_GBps=round(copy_gbps, 2), ratio_to_copy=round(gbps / copy_gbps, 3),
                   bytes_formula=f"{ADAMW_BYTES_PER_PARAM} B/param (read master, grad bf16, m, v; write master, "
                                 "m, v, bf16 weights); copy: read + write bytes of a 14→14 B/param copy")
    return dict(summary=f"{figures['params_per_s']:.3g} params/s, {figures['effective_GBps']} GB/s "
                        f"({figures['ratio_to_copy']}× a plain copy), {figures['implementation']}",
                figures=figures)


# ---- (e) engine steps on real widths -------------------------------------------------------------------------
ENGINE_WORKLOADS = {
    # name: (model config overrides of the llama-8b preset, batch, seq, measured steps)
    "8b": (dict(num_layers=4), 8, 4096, 4),                                       # Llama-3-8B width, 32K tokens
    "70b": (dict(hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8, num_layers=2,
                 tie_word_embeddings=True), 4, 4096, 3),                           # Llama-3-70B layers, 16K tokens
}


def engine(quick: bool, workload: str, device: str = "cuda") -> dict:
    """A few optimizer steps of the engine, random init, the real vocabulary; the kernels are whatever
    HORIZON_KERNELS selects (the driver sets it per part). ``device="cpu"`` (with quick) checks this code on CPU."""
    import horizon_triton as ht
    if device == "cuda":
        _cuda()
    overrides, batch, seq, steps = ENGINE_WORKLOADS[workload]
    if quick:   # a toy of the same family: the smoke test of this part, on any device
        overrides = dict(hidden_size=128, intermediate_size=256, num_heads=2, num_kv_heads=1, num_layers=2,
                         vocab_size=512, tie_word_embeddings=overrides.get("tie_word_embeddings", False))
        batch, seq, steps = 1, 64, 2
    cfg = ht.preset("llama-8b", **overrides)
    trace_dir = tempfile.TemporaryDirectory(prefix="gpu_check_")
    trace = os.path.join(trace_dir.name, "trace.json")
    start = time.perf_counter()
    eng = ht.Engine(cfg, ht.TrainConfig(device=device, lr=1e-5, trace_path=trace))
    build_s = time.perf_counter() - start
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "labels": ids}]
    start = time.perf_counter()
    eng.fit(batches)                                  # warm-up: compiles, cuBLAS and allocator caches
    warmup_s = time.perf_counter() - start
    _fresh_tracer(eng)                                # the figures below cover the measured steps only
    history = eng.fit(batches * steps)
    # the first measured step found every layer updated (fit waits for the optimizer at its end); the later ones
    # wait for the previous step's CPU AdamW as a long run does
    step_s = statistics.median(h["time_s"] for h in history[1:])
    with open(trace) as f:
        events = json.load(f)
    trace_dir.cleanup()
    summary = events["otherData"]
    optimizer_s = sum(e["dur"] for e in events["traceEvents"] if e.get("cat") == "optimizer") / 1e6 / steps
    six_pt, model, tokens = engine_flops(cfg, batch, seq, 1)
    peak = peak_tflops(torch.cuda.get_device_name()) if device == "cuda" else None
    last = history[-1]
    figures = dict(
        kernels=eng.kernel_backend, ops_ran=_ops_ran(eng.kernel_report), tuned=_tuned_choices(), model=_describe(cfg),
        parameters=cfg.num_parameters(), tokens_per_step=tokens,
        batch=batch, seq=seq, measured_steps=steps, build_s=round(build_s, 1), warmup_step_s=round(warmup_s, 1),
        step_s=_sig(step_s), step_times_s=[_sig(h["time_s"]) for h in history],
        tokens_per_s=round(tokens / step_s), tflops_model=_sig(model / step_s / 1e12),
        tflops_6pt=_sig(six_pt / step_s / 1e12),
        mfu=None if peak is None else round(model / step_s / 1e12 / peak, 3),
        compute_busy=_round(summary.get("compute_busy")),
        compute_s_per_step=_round(summary.get("compute_seconds", 0) / steps),
        copy_hidden=_round(summary.get("copy_hidden")),
        hidden_copy_s_per_step=_round(summary.get("copy_hidden", 0) * summary.get("copy_seconds", 0) / steps),
        copy_s_per_step=_round(summary.get("copy_seconds", 0) / steps),
        optimizer_s_per_step=round(optimizer_s, 4),
        device_peak_GiB=round(last["device_peak_bytes"] / GiB, 2),
        device_allocator_peak_GiB=round(last.get("device_allocator_peak_bytes", 0) / GiB, 2),
        host_store_GiB=round(last["host_peak_bytes"] / GiB, 2),
        losses=[round(h["loss"], 4) for h in history],
        flop_formulas=STEP_FLOP_FORMULAS,
        busy_note="compute_busy: the Tracer's compute-stream busy fraction over the traced span of the measured fit "
                  "(its last optimizer update included); compute_s_per_step / step_s is the steady share")
    eng.close()
    f = figures
    return dict(summary=f"{f['kernels']}: {f['tokens_per_s']:,} tok/s, {f['tflops_model']} model TFLOPS "
                        f"({f['tflops_6pt']} 6PT), busy {f['compute_busy']}, adamw {f['optimizer_s_per_step']} s/step, "
                        f"peak {f['device_allocator_peak_GiB']} GiB",
                figures=figures)


# a gpt-oss-like MoE at a width one GPU steps quickly: 128 experts top-4, so a micro-batch of 1×2048 gives each
# expert 64 tokens (gpt-oss-120b at 1×4096: 128); 4 micro-batches a step
MOE_MERGE_MODEL = dict(vocab_size=32768, hidden_size=2048, intermediate_size=4096, moe_intermediate_size=768,
                       num_experts=128, num_experts_per_tok=4, num_hidden_layers=2, num_attention_heads=16,
                       num_key_value_heads=4, head_dim=128, max_position_embeddings=4096)
MOE_MERGE_STEP = (4, 2048, 2)              # micro-batches a step, tokens each, measured steps


def moe_merge(quick: bool, device: str = "cuda") -> dict:
    """The same MoE steps with each micro-batch through a layer on its own (moe_merge_microbatches=1) and all of
    them together (=4: the experts' grouped GEMMs once over all their tokens): what decides its default."""
    import transformers

    import horizon_triton as ht
    from horizon_triton.models.generic.config import GenericConfig
    if device == "cuda":
        _cuda()
    model, (micro, seq, steps) = dict(MOE_MERGE_MODEL), MOE_MERGE_STEP
    if quick:
        model.update(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32)
        micro, seq, steps = 2, 32, 2
    cfg = GenericConfig.from_hf(transformers.AutoConfig.for_model("qwen3_moe", **model))
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, cfg.vocab_size, (1, seq), generator=g)), "labels": ids}
               for _ in range(micro)]
    figures = dict(model=f"qwen3_moe H={model['hidden_size']} E={model['num_experts']} top-"
                         f"{model['num_experts_per_tok']} I={model['moe_intermediate_size']} "
                         f"L={model['num_hidden_layers']}", micro_batches=micro, tokens_each=seq,
                   tokens_per_expert_each=seq * model["num_experts_per_tok"] // model["num_experts"])
    for together in (1, micro):
        eng = ht.Engine(cfg, ht.TrainConfig(device=device, lr=1e-5, grad_accum_steps=micro,
                                            moe_merge_microbatches=together))
        eng.fit(batches)                                   # warm-up: compiles, cuBLAS and allocator caches
        history = eng.fit(batches * steps)
        figures[f"merged_{together}"] = dict(step_s=_sig(statistics.median(h["time_s"] for h in history)),
                                             losses=[round(h["loss"], 4) for h in history],
                                             device_peak_GiB=round(history[-1]["device_peak_bytes"] / GiB, 2))
        eng.close()
    one, merged = figures["merged_1"]["step_s"], figures[f"merged_{micro}"]["step_s"]
    figures["merged_over_one_at_a_time"] = _sig(merged / one)
    return dict(summary=f"MoE step {one} s one micro-batch at a time, {merged} s with {micro} together "
                        f"({figures['merged_over_one_at_a_time']}×)", figures=figures)


def _ops_ran(kernel_report: dict) -> dict:
    """{what ran: [ops]}: "triton", "library (why the canary replaced it)", "reference", ..."""
    ran = {}
    for op, path in kernel_report.items():
        ran.setdefault(path, []).append(op)
    return ran


def _tuned_choices() -> dict | str:
    """{kernel: {shape key: the implementation its stored choice runs}} for this GPU: "torch" (cuBLAS),
    "triton", or per GEMM role where a kernel has several (cross-entropy)."""
    from horizon_triton.kernels import tuning
    stored = tuning.stored_choices()
    if not stored:
        return "none stored on this machine: every kernel ran its default config"

    def ran(cfg: dict):
        if all(isinstance(v, dict) for v in cfg.values()):
            return {role: ran(c) for role, c in cfg.items() if "impl" in c} or "triton"
        return cfg.get("impl", "triton")
    return {kernel: {key: ran(cfg) for key, cfg in shapes.items()} for kernel, shapes in stored.items()}


def _fresh_tracer(eng) -> None:
    from horizon_triton.schedule.trace import Tracer
    eng.tracer = eng.pipeline.tracer = eng.optimizer.tracer = Tracer()


def _describe(cfg) -> str:
    return (f"H={cfg.hidden_size} I={cfg.intermediate_size} heads {cfg.num_heads}/{cfg.num_kv_heads} "
            f"L={cfg.num_layers} V={cfg.vocab_size}{' tied' if cfg.tie_word_embeddings else ''}")


def _round(x, digits: int = 4):
    return None if x is None else round(x, digits)


PARTS = {
    "attention": attention, "rmsnorm_matmul": rmsnorm_matmul, "cross_entropy": cross_entropy,
    "host_to_device": host_to_device, "cpu_adam": cpu_adam,
    "engine_8b": lambda quick, device: engine(quick, "8b", device),
    "engine_70b": lambda quick, device: engine(quick, "70b", device), "moe_merge": moe_merge,
}
TAKE_DEVICE = ("engine_8b", "engine_70b", "moe_merge")     # parts that also run on CPU (with --device cpu)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--result", required=True, help="JSON file to write the part's result to")
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke test)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help=f"where {', '.join(TAKE_DEVICE)} run (cpu: to check this script without a GPU)")
    args = parser.parse_args(argv)
    if args.device != "cuda" and args.part not in TAKE_DEVICE:
        parser.error(f"--device {args.device}: only {', '.join(TAKE_DEVICE)} run off CUDA")
    run = PARTS[args.part]
    try:
        result = dict(status="ok", **(run(args.quick, args.device) if args.part in TAKE_DEVICE else run(args.quick)))
    except Skipped as skip:
        result = dict(status="skipped", reason=str(skip))
    with open(args.result, "w") as f:
        json.dump(result, f, indent=1, default=str, ensure_ascii=False)


if __name__ == "__main__":
    sys.exit(main())

"""plan: what a training step needs and how fast it goes, from a model config alone.

    import horizon_triton as ht
    ht.plan(ht.preset("llama-8b"), tokens_per_step=32768, hardware="h100")

Memory, bus bytes and FLOPs come from the dry run (dryrun.py: the real engine on the meta device). The step time
replays the dry run's timeline (MetaDevice.timeline: every task of every stream, every event record and wait, in
the order the host issued them) against the hardware's figures, with the overlaps the scheduler really has:
- each stream (compute, copy_in, copy_out) runs its tasks in order; a task starts once its stream is free, the
  events its stream waits for have completed, and the host has issued it;
- the host issues work without waiting, except where run_step syncs and where stream_in waits for the CPU AdamW
  to have updated a layer;
- the CPU AdamW of the previous step starts with the step and updates layer 0, 1, 2, … one after the other, so
  the forward overlaps it, layer by layer (the steady state of fit());
- a compute task takes Σ over its kinds of max(FLOPs / rate, bytes / device-memory bandwidth), a roofline per
  kind of work; a copy takes bytes / bus bandwidth; a layer's AdamW its host bytes / host-memory bandwidth.
On the CPU device nothing overlaps (SyncDevice runs every stream in the host thread and the AdamW worker shares
its cores), so there the step time is the sum of everything.
"""
from __future__ import annotations

import itertools
import math
import re
from dataclasses import replace

from ..state.checkpoint import DTYPES
from ..config import ModelConfig, TrainConfig
from ..devices.device import STREAMS, host_memory_info
from .dryrun import DryRun, dry_run, host_store_bytes
from ..schedule.activations import CROSS_ENTROPY_TOKEN_CHUNK
from ..objectives.lora import spec_of
from ..host.store import HostStore
from ..models.family import is_generic
from .moe import DEFAULT_SKEW, moe_summary

GiB = 2**30

# Hardware figures. TFLOPS and GB/s are what the engine's work reaches, not datasheet peaks, where we know it.
# device: "cuda" (Triton kernels, pinned store, overlapped streams) or "cpu" (the torch path, nothing overlaps).
# device_memory_bytes: what the engine's tensors may use (the driver's total less ~1 GiB for the CUDA context,
# cuBLAS workspaces and loaded kernels). host_gbps: host-memory bandwidth of the one-pass CPU AdamW.
HARDWARE = {
    # H100 SXM: 790-800 TFLOPS measured for an 8192³ bf16 matmul (REFERENCE.md; 989 peak); fp32 GEMMs (torch keeps
    # TF32 off for matmuls) ~3/4 of the 67 TFLOPS fp32 peak; attention as FA2 on H100 (REFERENCE.md: forward
    # ≈ 370, backward 214-322); HBM3 3.35 TB/s, ~85% of it for streaming kernels; PCIe Gen5 x16 50 GB/s
    # measured with pinned memory (REFERENCE.md); 81,559 MiB card. host_gbps: a dual-socket DDR5 server streams
    # 400-600 GB/s; a one-pass AdamW reaches about the copy bandwidth (kernels/cpu_adam.py): 150 GB/s assumed.
    "h100": dict(device="cuda", bf16_tflops=800, fp32_tflops=50, attention_fwd_tflops=370, attention_bwd_tflops=250,
                 device_gbps=2850, h2d_gbps=50, d2h_gbps=50, host_gbps=150, device_memory_bytes=int(78.5 * GiB)),
    # H200: the H100's compute (REFERENCE.md: "H200 likewise"), HBM3e 4.8 TB/s, 143,771 MiB, same PCIe Gen5 host.
    "h200": dict(device="cuda", bf16_tflops=800, fp32_tflops=50, attention_fwd_tflops=370, attention_bwd_tflops=250,
                 device_gbps=4100, h2d_gbps=50, d2h_gbps=50, host_gbps=150, device_memory_bytes=int(139 * GiB)),
    # GH200 (96 GB HBM3): the H100's compute; NVLink-C2C 300-375 GB/s measured each way (REFERENCE.md); Grace's
    # LPDDR5X peaks at ~500 GB/s, 350 assumed for the AdamW; 97,871 MiB.
    "gh200": dict(device="cuda", bf16_tflops=800, fp32_tflops=50, attention_fwd_tflops=370, attention_bwd_tflops=250,
                  device_gbps=3400, h2d_gbps=330, d2h_gbps=330, host_gbps=350, device_memory_bytes=int(94.5 * GiB)),
    # A100 SXM 80 GB (not in REFERENCE.md; our assumptions): cuBLAS reaches ~80% of the 312 bf16 / 19.5 fp32 TFLOPS
    # peaks; FA2's published A100 attention is ~50-70% of peak, 170 / 120 assumed for Triton kernels; HBM2e
    # 2.0 TB/s; PCIe Gen4 x16 is 32 GB/s in theory, ~24 measured with pinned memory on such servers; a DDR4-era
    # dual-socket host: 100 GB/s for the AdamW; 81,920 MiB.
    "a100": dict(device="cuda", bf16_tflops=250, fp32_tflops=16, attention_fwd_tflops=170, attention_bwd_tflops=120,
                 device_gbps=1700, h2d_gbps=24, d2h_gbps=24, host_gbps=100, device_memory_bytes=int(78.9 * GiB)),
    # The CPU device (not in REFERENCE.md): measured on the 2-core dev machine (Xeon with AMX, shared), torch 2.13,
    # 2 threads, 2026-12-01: bf16 matmul 250-350 GFLOPS at 1024-2048², fp32 40-50; elementwise ops that allocate
    # their output (the references do) 1.2-2.7 GB/s, a copy into an existing buffer 4-8 GB/s; the C++ AdamW ~25 GB/s
    # (REFERENCE.md's copy bandwidth of this machine class). Attention runs as the reference's fp32 matmuls.
    # device_memory_bytes None: the device is host memory.
    "cpu": dict(device="cpu", bf16_tflops=0.3, fp32_tflops=0.045, attention_fwd_tflops=0.045,
                attention_bwd_tflops=0.045, device_gbps=2.0, h2d_gbps=6.0, d2h_gbps=6.0, host_gbps=25.0,
                device_memory_bytes=None),
}
FIGURES = tuple(HARDWARE["h100"])
HIDDEN_WITHIN = 1.05   # transfers "hide" when the step takes at most 5% longer than with an infinitely fast bus
# Host bytes the one-pass AdamW moves per byte of each store buffer: the gradient is only read, the bf16 working
# copy only written; everything else (fp32 master, moments, any other state) is read and written once.
OPTIMIZER_PASSES = {"grad": 1, "working": 1}


def hardware_figures(hardware: str | dict) -> dict:
    """The figures of a named machine, or a dict of them (``{"like": "h100", "h2d_gbps": 25}`` starts from one)."""
    if isinstance(hardware, str):
        if hardware not in HARDWARE:
            raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}, or a dict of {FIGURES}")
        figures = dict(HARDWARE[hardware], name=hardware)
    else:
        base = hardware.get("like")
        if base is not None and base not in HARDWARE:
            raise ValueError(f"hardware 'like': {base!r} is not one of {', '.join(HARDWARE)}")
        figures = {**(HARDWARE[base] if base else {}), "name": base or "custom", **hardware}
        figures.pop("like", None)
        missing = [k for k in FIGURES if k not in figures]
        if missing:
            raise ValueError(f"hardware dict lacks {', '.join(missing)} (or give 'like': 'h100' to start from one)")
    if figures["device"] not in ("cuda", "cpu"):
        raise ValueError(f"hardware device must be 'cuda' or 'cpu', got {figures['device']!r}")
    if figures["device_memory_bytes"] is None:
        figures["device_memory_bytes"] = host_memory_info()[1]
    return figures


def _rate(kind: str, hw: dict) -> float | None:
    """FLOP/s of a kind of work, None for memory-bound kinds (their time is their bytes)."""
    if kind.startswith("gemm_"):
        return (hw["fp32_tflops"] if kind == "gemm_float32" else hw["bf16_tflops"]) * 1e12
    if kind in ("attention_fwd", "attention_bwd"):
        return hw[f"{kind}_tflops"] * 1e12
    return None


def task_seconds(costs: dict, hw: dict) -> float:
    seconds = 0.0
    for kind, (flops, nbytes) in costs.items():
        if kind in ("h2d", "d2h"):
            seconds += nbytes / (hw[f"{kind}_gbps"] * 1e9)
            continue
        rate = _rate(kind, hw)
        seconds += max(flops / rate if rate else 0.0, nbytes / (hw["device_gbps"] * 1e9))
    return seconds


def optimizer_seconds(allocations, hw: dict) -> list[float]:
    """Seconds of the CPU AdamW per layer: the host bytes it reads and writes over host-memory bandwidth."""
    per_layer: dict[int, int] = {}
    for a in allocations:
        moved = 0 if a.frozen else a.nbytes * OPTIMIZER_PASSES.get(a.kind.removeprefix("lora_"), 2)
        per_layer[a.layer] = per_layer.get(a.layer, 0) + moved      # a frozen LoRA base: never touched
    return [per_layer[i] / (hw["host_gbps"] * 1e9) for i in sorted(per_layer)]


def simulate(dry: DryRun, hw: dict) -> dict:
    """Step time and busy seconds per stream (and the AdamW's) of the dry run's timeline on this hardware."""
    opt = optimizer_seconds(dry.layer_allocations, hw)
    busy = {name: 0.0 for name in STREAMS}
    busy["optimizer"] = sum(opt)
    if hw["device"] == "cpu":
        for item in dry.timeline:
            if item[0] == "task":
                busy[item[1]] += task_seconds(item[2], hw)
        return {"step_time_s": sum(busy.values()), "busy_s": busy}
    opt_done = list(itertools.accumulate(opt))
    free = {name: 0.0 for name in STREAMS}
    host, done = 0.0, {}
    for item in dry.timeline:
        what = item[0]
        if what == "task":
            seconds = task_seconds(item[2], hw)
            stream = item[1]
            free[stream] = max(free[stream], host) + seconds
            busy[stream] += seconds
        elif what == "record":
            done[id(item[2])] = free[item[1]]
        elif what == "wait":
            free[item[1]] = max(free[item[1]], done[id(item[2])])
        elif what == "sync":
            host = max(host, done[id(item[1])])
        elif what == "wait_layer":
            host = max(host, opt_done[item[1]])
    return {"step_time_s": max(host, *free.values()), "busy_s": busy}


def _hidden(dry: DryRun, hw: dict) -> bool:
    fast_bus = dict(hw, h2d_gbps=math.inf, d2h_gbps=math.inf)
    return simulate(dry, hw)["step_time_s"] <= HIDDEN_WITHIN * simulate(dry, fast_bus)["step_time_s"]


def _dry(model_cfg, train_cfg, hw, tokens_per_step, seq_len=None, doc_len=None) -> DryRun:
    return dry_run(model_cfg, train_cfg, tokens_per_step=tokens_per_step, seq_len=seq_len, doc_len=doc_len,
                   kernel_backend="triton" if hw["device"] == "cuda" else "torch",
                   device_memory_bytes=hw["device_memory_bytes"], pin_memory=hw["device"] == "cuda")


def _interpolated(a: DryRun, b: DryRun, rows_a: int, rows_b: int, rows: int) -> DryRun | None:
    """The dry run at ``rows`` rows per micro-batch from two others, when their timelines have one structure
    (the same tasks and events): every count is linear in the rows at a fixed sequence length (but for grid-sized
    workspaces, a few hundredths of a percent of the time), within one number of the head's token chunks and one
    side of the vocabulary (tokens_to_hide_transfers' ``piece``). None otherwise."""
    def structure(item):
        return item[0], item[1] if isinstance(item[1], (str, int)) else None, \
            tuple(item[2]) if item[0] == "task" else None

    if len(a.timeline) != len(b.timeline):
        return None
    items = []
    for x, y in zip(a.timeline, b.timeline):
        if structure(x) != structure(y):
            return None
        if x[0] != "task":
            items.append(x)
            continue
        w = (rows - rows_a) / (rows_b - rows_a)
        items.append(("task", x[1], {k: [f + w * (y[2][k][0] - f), n + w * (y[2][k][1] - n)]
                                     for k, (f, n) in x[2].items()}))
    return replace(a, timeline=items)


def tokens_to_hide_transfers(model_cfg, train_cfg, hw, seq_len: int, doc_len=None) -> int | None:
    """The fewest tokens per step (whole rows of seq_len in each micro-batch) at which the copies hide under the
    compute and the AdamW (the step within 5% of an infinitely fast bus). None where nothing overlaps (CPU)
    or not even at 2^16 rows per micro-batch."""
    if hw["device"] == "cpu":
        return None
    accum = (train_cfg or TrainConfig()).grad_accum_steps
    runs: dict[int, DryRun] = {}

    def run(rows: int) -> DryRun:
        if rows not in runs:
            runs[rows] = _dry(model_cfg, train_cfg, hw, accum * rows * seq_len, seq_len, doc_len)
        return runs[rows]

    def piece(rows: int) -> tuple[int, bool]:
        """Rows whose dry runs are linear in the rows between them: the same number of the head's token chunks
        per micro-batch, and the same side of the vocabulary (the dry run's ids: one per token up to it)."""
        tokens = rows * seq_len
        return -(-tokens // CROSS_ENTROPY_TOKEN_CHUNK), accum * tokens >= model_cfg.vocab_size

    def hidden(rows: int) -> bool:
        bases = [r for r in sorted(runs) if piece(r) == piece(rows)]
        between = None
        if rows not in runs and len(bases) >= 2:
            between = _interpolated(runs[bases[0]], runs[bases[-1]], bases[0], bases[-1], rows)
        return _hidden(between or run(rows), hw)

    low, high = 0, 1                      # hidden(high) once found; not hidden(low) (0: nothing tried)
    while not hidden(high):
        low, high = high, high * 2
        if high > 2**16:
            return None
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if hidden(mid) else (mid, high)
    return accum * high * seq_len


def plan(model_cfg: ModelConfig, train_cfg: TrainConfig | None = None, *, tokens_per_step: int,
         hardware: str | dict = "h100", seq_len: int | None = None, doc_len: int | None = None,
         host_memory_bytes: int | None = None, find_hiding: bool = True, moe_skew: float = DEFAULT_SKEW) -> dict:
    """Memory, bus bytes, FLOPs and step time of one optimizer step, from the dry run of the real engine.

    seq_len (default: min(tokens per micro-batch, max_position_embeddings)) and doc_len (packed documents) shape
    the micro-batches; train_cfg.grad_accum_steps says how many. host_memory_bytes, if given, is checked too.
    moe_skew: for a mixture-of-experts model, the busiest expert's tokens over the balanced T·k/E (planning.moe)."""
    hw = hardware_figures(hardware)
    dry = _dry(model_cfg, train_cfg, hw, tokens_per_step, seq_len, doc_len)
    sim = simulate(dry, hw)
    step = sim["step_time_s"]
    on_host = hw["device"] == "cpu"      # the CPU device's tensors are host memory too
    host = dry.host_bytes + (dry.device_peak_bytes if on_host else 0)
    tokens = dry.tokens_per_step
    model_flops = 6.0 * dry.num_parameters * tokens
    busy = sim["busy_s"]
    names = {"compute": "compute", "copy_in": "host->device copies", "copy_out": "device->host copies",
             "optimizer": "the CPU AdamW"}
    seq = dry.micro_batches[0][1]
    result = {
        "model": model_cfg, "hardware": hw["name"], "num_parameters": dry.num_parameters,
        "tokens_per_step": tokens, "micro_batches": dry.micro_batches,
        "host_bytes": host, "host_pinned_bytes": dry.host_pinned_bytes,
        "host_pageable_bytes": host - dry.host_pinned_bytes,
        "host_store_bytes": {f"{kind}{'' if pinned else ' (pageable)'}": n for kind, pinned, n in dry.host_store},
        "host_step_bytes": dry.host_step_bytes,
        "device_peak_bytes": dry.device_peak_bytes, "device_held_peak_bytes": dry.device_held_peak_bytes,
        "device_fixed_bytes": dry.device_fixed_bytes, "device_workspace_bytes": dry.device_workspace_at_peak,
        "device_memory_bytes": hw["device_memory_bytes"],
        "fits_device": (host if on_host else dry.device_peak_bytes) <= hw["device_memory_bytes"],
        "h2d_bytes_per_step": dry.h2d_bytes, "d2h_bytes_per_step": dry.d2h_bytes,
        "flops_per_step": sum(dry.flops.values()), "flops_by_kind": dict(dry.flops),
        "model_flops_per_step": model_flops,
        "step_time_s": step, "busy_s": busy, "tokens_per_s": tokens / step,
        "model_tflops": model_flops / step / 1e12, "hardware_tflops": sum(dry.flops.values()) / step / 1e12,
        "bottleneck": names[max(busy, key=busy.get)],
        "tokens_to_hide_transfers": (tokens_to_hide_transfers(model_cfg, train_cfg, hw, seq, doc_len)
                                     if find_hiding else None),
    }
    moe = moe_summary(model_cfg, dry, hw, moe_skew)
    if moe is not None:
        result["moe"] = moe
    if host_memory_bytes is not None:
        result["host_memory_bytes"] = host_memory_bytes
        result["fits_host"] = host <= host_memory_bytes
    spec = spec_of(train_cfg)
    if spec is not None:             # the base frozen: its bytes and the adapters' apart
        adapter = [a for a in dry.layer_allocations if a.kind.startswith("lora_")]
        adapter_params = sum(a.numel for a in adapter if a.kind == "lora_exp_avg")
        base_bytes = sum(a.reserved_bytes for a in dry.layer_allocations if a.frozen)
        result["lora"] = {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets),
                          "adapter_parameters": adapter_params,
                          "adapter_host_bytes": sum(a.reserved_bytes for a in adapter), "base_host_bytes": base_bytes,
                          "host_bytes_per_base_parameter": host / dry.num_parameters}
    return result


def _with_layers(model_cfg: ModelConfig, num_layers: int) -> ModelConfig:
    return replace(model_cfg, num_layers=num_layers, source_path=None)


def largest_model(model_cfg: ModelConfig, train_cfg: TrainConfig | None = None, *, tokens_per_step: int,
                  hardware: str | dict = "h100", host_memory_bytes: int, seq_len: int | None = None) -> dict | None:
    """The plan of the deepest model of this shape (its width, more or fewer layers) that fits the host memory and
    the device, or None if not even one layer does. Host fit is searched on the store layout alone (cheap),
    then the device on whole dry runs."""
    if is_generic(model_cfg):
        raise ValueError(f"largest_model: model type {model_cfg.model_type!r} runs on the generic layer template, "
                         "whose deeper variants have no defined layer pattern; plan() gives its own depth")
    hw = hardware_figures(hardware)
    dtype = DTYPES[(train_cfg or TrainConfig()).compute_dtype]

    def store_fits(layers: int) -> bool:
        store = HostStore(_with_layers(model_cfg, layers), dtype, pin=hw["device"] == "cuda", device="meta",
                          lora=spec_of(train_cfg))
        return sum(n for _, _, n in host_store_bytes(store.allocations)) <= host_memory_bytes

    def fits(layers: int) -> dict | None:
        result = plan(_with_layers(model_cfg, layers), train_cfg, tokens_per_step=tokens_per_step, hardware=hw,
                      seq_len=seq_len, host_memory_bytes=host_memory_bytes, find_hiding=False)
        return result if result["fits_device"] and result["fits_host"] else None

    low, high = 0, 1                       # store_fits(low) (0: trivially); the first failing depth is found
    while store_fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if store_fits(mid) else (low, mid)
    # the device peak grows with depth only through what it keeps per layer: one dry run when the host limit
    # fits the device too, else a bisection on whole dry runs
    if low == 0:
        return None
    best = fits(low)
    if best is not None:
        return best
    high = low
    low = 0                                # fits(low) (0: nothing), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        result = fits(mid)
        if result is not None:
            best, low = result, mid
        else:
            high = mid
    return best


# ------------------------------------------------------------------------------------------------------------
# reading it: sizes in and out, the table
# ------------------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'1.5TB' -> 1.5e12 bytes, '512GiB' -> 512·2^30; decimal units unless the unit says i."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: write e.g. 1.5TB, 512GiB, 2e12")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _size(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def _si(n: float, unit: str) -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def format_plan(result: dict, largest: dict | None = None) -> str:
    """The plan as a short table (one line a question). Host sizes in decimal units, as RAM is sold; device
    sizes in GiB, as the driver reports them."""
    cfg = result["model"]
    rows, seq = result["micro_batches"][0]
    accum = len(result["micro_batches"])
    yes = {True: "fits", False: "DOES NOT FIT"}
    host = f"{_si(result['host_bytes'], 'B')} (pinned {_si(result['host_pinned_bytes'], 'B')})"
    if "fits_host" in result:
        host = f"{host:<34}{yes[result['fits_host']]} in {_si(result['host_memory_bytes'], 'B')}"
    device = f"{_size(result['device_peak_bytes'])} of {_size(result['device_memory_bytes'])}"
    flops = result["flops_by_kind"]
    gemm = {k.removeprefix("gemm_"): v for k, v in flops.items() if k.startswith("gemm_")}
    attention = flops.get("attention_fwd", 0.0) + flops.get("attention_bwd", 0.0)
    work = ", ".join([f"GEMM {dtype} {v / 1e15:.2f}" for dtype, v in gemm.items()]
                     + [f"attention {attention / 1e15:.2f}"])
    busy = result["busy_s"]
    lines = [
        f"{cfg.model_type} {result['num_parameters'] / 1e9:.1f}B: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size:,}; {result['tokens_per_step']:,} tokens a step ({accum} x {rows} x {seq}) on "
        f"{result['hardware']}",
        f"  host memory     {host}",
        f"  device peak     {device:<34}{yes[result['fits_device']]} (slots + accumulators "
        f"{_size(result['device_fixed_bytes'])})",
        f"  bus per step    {_size(result['h2d_bytes_per_step'])} in, {_size(result['d2h_bytes_per_step'])} out",
        f"  work per step   {result['flops_per_step'] / 1e15:.2f} PFLOP: {work}",
        f"  step time       {result['step_time_s']:.2f} s, bound by {result['bottleneck']} (busy: compute "
        f"{busy['compute']:.2f} s, copy in {busy['copy_in']:.2f} s, copy out {busy['copy_out']:.2f} s, "
        f"AdamW {busy['optimizer']:.2f} s)",
        f"  throughput      {result['tokens_per_s']:,.0f} tokens/s, {result['model_tflops']:.0f} 6PT-TFLOPS",
    ]
    if "lora" in result:
        lo = result["lora"]
        lines.insert(1, f"  LoRA            rank {lo['rank']} ({', '.join(lo['targets'])}), "
                        f"{lo['adapter_parameters'] / 1e6:,.1f}M adapter params: host "
                        f"{lo['host_bytes_per_base_parameter']:.2f} B per base param (frozen base "
                        f"{_si(lo['base_host_bytes'], 'B')}, adapters {_si(lo['adapter_host_bytes'], 'B')})")
    if "moe" in result:
        moe = result["moe"]
        lines.insert(-3, f"  experts         {moe['experts_parameters'] / 1e9:.1f}B params in {moe['experts_layers']} "
                         f"layers ({moe['experts_share_of_host_store']:.0%} of the host store), top {moe['top_k']} of "
                         f"{moe['experts_per_layer']}: {moe['tokens_per_expert']:,.0f} tokens per expert per "
                         f"micro-batch, {moe['tokens_per_expert_to_hide']:,.0f} hide its weights' copies "
                         f"({moe['tokens_per_micro_batch_to_hide']:,.0f} tokens per micro-batch)")
        lines.insert(-3, f"  skewed routing  busiest expert {moe['skew']:g}× balanced: "
                         f"{moe['tokens_per_expert_busiest']:,.0f} tokens; the grouped GEMM bound by it takes "
                         f"{moe['experts_time_factor']:.2g}× as long for the same work, so its copies hide from "
                         f"{moe['tokens_per_micro_batch_to_hide_skewed']:,.0f} tokens per micro-batch")
    if result["tokens_to_hide_transfers"] is not None:
        lines.append(f"  copies hide at  {result['tokens_to_hide_transfers']:,} tokens a step (rows of {seq})")
    if largest is not None:
        lines.append(f"  largest that fits: {largest['model'].num_layers} layers of this shape "
                     f"({largest['num_parameters'] / 1e9:.1f}B parameters; host {_si(largest['host_bytes'], 'B')}, "
                     f"device {_size(largest['device_peak_bytes'])})")
    return "\n".join(lines)

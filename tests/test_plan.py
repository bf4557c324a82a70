"""ht.plan and its step-time model (horizon_triton/planning/plan.py): the stream replay against hand-computed schedules, the
roofline bounds, the transfer-hiding threshold against plans on either side of it, and the largest model."""
import math

import pytest
import torch

import horizon_triton as ht
from horizon_triton.devices.device import MetaEvent
from horizon_triton.planning.dryrun import DryRun
from horizon_triton.planning.plan import (HARDWARE, _dry, _hidden, _interpolated, format_plan, hardware_figures, largest_model,
                                 parse_bytes, plan, simulate, task_seconds)
from horizon_triton.host.store import Allocation

# 1 GB/s everywhere and 1 TFLOPS: a task of 1e9 bytes or 1e12 FLOPs takes one second
UNIT = dict(device="cuda", bf16_tflops=1.0, fp32_tflops=1.0, attention_fwd_tflops=1.0, attention_bwd_tflops=1.0,
            device_gbps=1.0, h2d_gbps=1.0, d2h_gbps=1.0, host_gbps=1.0, device_memory_bytes=10**12)
SMALL = ht.ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4,
                       num_kv_heads=2)


def _timeline_run(timeline, optimizer_bytes=()):
    """A DryRun holding only a timeline and, per layer, one fp32 store buffer of the given bytes, which the AdamW
    reads and writes once."""
    allocations = [Allocation("master", i, n // 4, torch.float32, True) for i, n in enumerate(optimizer_bytes)]
    return DryRun(model_cfg=SMALL, train_cfg=ht.TrainConfig(), micro_batches=[(1, 1)], num_parameters=0,
                  host_store=[], host_step_bytes=0, host_step_pinned=True, device_peak_bytes=0,
                  device_held_peak_bytes=0, device_fixed_bytes=0, device_held_at_peak=0,
                  device_workspace_at_peak=0, h2d_bytes=0, d2h_bytes=0, flops={}, device_memory_bytes={},
                  timeline=timeline, layer_allocations=allocations)


def _copy(seconds):
    return ("task", "copy_in", {"h2d": [0, int(seconds * 1e9)]})


def _compute(seconds):
    return ("task", "compute", {"gemm_bfloat16": [seconds * 1e12, 0]})


def test_copies_overlap_compute_as_the_events_allow():
    # double buffering: layer 1's copy runs under layer 0's compute; compute waits for each copy
    e0, e1, done = MetaEvent("copy_in", 0), MetaEvent("copy_in", 0), MetaEvent("compute", 0)
    timeline = [_copy(2), ("record", "copy_in", e0), _copy(2), ("record", "copy_in", e1),
                ("wait", "compute", e0), _compute(3), ("wait", "compute", e1), _compute(3),
                ("record", "compute", done), ("sync", done)]
    result = simulate(_timeline_run(timeline), dict(UNIT, name="unit"))
    assert result["step_time_s"] == pytest.approx(2 + 3 + 3)          # the second copy is hidden
    assert result["busy_s"]["copy_in"] == pytest.approx(4)
    slow = dict(UNIT, h2d_gbps=0.25, name="slow bus")                    # copies of 8 s: compute waits for them
    assert simulate(_timeline_run(timeline), slow)["step_time_s"] == pytest.approx(8 + 8 + 3)


def test_stream_in_waits_for_the_adamw_of_each_layer():
    # the AdamW of layers 0 and 1 take 2 s each (a 1e9-byte buffer read and written at 1 GB/s)
    copied = [MetaEvent("copy_in", 0), MetaEvent("copy_in", 0)]
    done = MetaEvent("compute", 0)
    timeline = [("wait_layer", 0), _copy(1), ("record", "copy_in", copied[0]), ("wait", "compute", copied[0]),
                _compute(1), ("wait_layer", 1), _copy(1), ("record", "copy_in", copied[1]),
                ("wait", "compute", copied[1]), _compute(1), ("record", "compute", done), ("sync", done)]
    run = _timeline_run(timeline, optimizer_bytes=[10**9, 10**9])
    result = simulate(run, dict(UNIT, name="unit"))
    # copy 0 starts at 2 (AdamW 0 done), compute 0 ends at 4; copy 1 starts at 4 (AdamW 1 done), compute 1 at 6
    assert result["step_time_s"] == pytest.approx(6)
    assert result["busy_s"]["optimizer"] == pytest.approx(4)
    serial = dict(UNIT, device="cpu", name="no overlap")
    assert simulate(run, serial)["step_time_s"] == pytest.approx(4 + 4)


def test_task_time_is_a_roofline_per_kind():
    costs = {"gemm_bfloat16": [2e12, 1e9], "elementwise": [1e12, 3e9], "attention_fwd": [1e11, 5e9]}
    assert task_seconds(costs, UNIT) == pytest.approx(2 + 3 + 5)


def test_plan_reports_every_figure_within_its_roofline_bounds():
    result = plan(SMALL, tokens_per_step=1024, hardware="h100", host_memory_bytes=2**40)
    for key in ("host_bytes", "host_pinned_bytes", "device_peak_bytes", "h2d_bytes_per_step", "d2h_bytes_per_step",
                "flops_per_step", "step_time_s", "tokens_per_s", "model_tflops", "bottleneck",
                "tokens_to_hide_transfers"):
        assert result[key] is not None, key
    busy = result["busy_s"]
    assert max(busy.values()) <= result["step_time_s"] * (1 + 1e-9) <= sum(busy.values()) * (1 + 1e-9)
    assert result["tokens_per_s"] == pytest.approx(1024 / result["step_time_s"])
    assert result["model_tflops"] == pytest.approx(6 * SMALL.num_parameters() * 1024 / result["step_time_s"] / 1e12)
    assert result["fits_host"] and result["fits_device"]
    text = format_plan(result)
    assert "device peak" in text and f"bound by {result['bottleneck']}" in text


def test_transfers_hide_from_the_reported_tokens_and_not_one_row_before():
    cfg = ht.ModelConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                         num_kv_heads=2)
    hw = hardware_figures("h100")
    seq = 256
    tokens = plan(cfg, tokens_per_step=seq, seq_len=seq, hardware=hw)["tokens_to_hide_transfers"]
    assert tokens is not None and tokens % seq == 0 and tokens > seq
    assert _hidden(_dry(cfg, None, hw, tokens, seq), hw)
    assert not _hidden(_dry(cfg, None, hw, tokens - seq, seq), hw)


def test_interpolated_dry_run_equals_the_real_one():
    hw = hardware_figures("h100")
    runs = {rows: _dry(SMALL, None, hw, rows * 128, 128) for rows in (1, 2, 5)}
    between = _interpolated(runs[1], runs[2], 1, 2, 5)
    # linear but for workspaces sized by the grid (rmsnorm backward's partial sums: min(tokens, 4 · SMs) rows)
    assert simulate(between, hw)["step_time_s"] == pytest.approx(simulate(runs[5], hw)["step_time_s"], rel=1e-3)


def test_largest_model_fits_and_one_more_layer_does_not():
    host = 3 * 2**30
    best = largest_model(SMALL, tokens_per_step=512, hardware="h100", host_memory_bytes=host)
    layers = best["model"].num_layers
    assert best["fits_host"] and best["fits_device"] and layers > SMALL.num_layers
    deeper = plan(ht.ModelConfig(**{**SMALL.__dict__, "num_layers": layers + 1}), tokens_per_step=512,
                  hardware="h100", host_memory_bytes=host, find_hiding=False)
    assert not (deeper["fits_host"] and deeper["fits_device"])


def test_hardware_figures_named_or_given():
    assert hardware_figures("gh200")["h2d_gbps"] == HARDWARE["gh200"]["h2d_gbps"]
    custom = hardware_figures({"like": "h100", "h2d_gbps": 25})
    assert custom["h2d_gbps"] == 25 and custom["bf16_tflops"] == HARDWARE["h100"]["bf16_tflops"]
    with pytest.raises(ValueError, match="unknown hardware 'h900'"):
        hardware_figures("h900")
    with pytest.raises(ValueError, match="lacks"):
        hardware_figures({"device": "cuda", "bf16_tflops": 1})


def test_parse_bytes():
    assert parse_bytes("1.5TB") == 1.5e12
    assert parse_bytes("512GiB") == 512 * 2**30
    assert parse_bytes("2e12") == 2 * 10**12
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        parse_bytes("lots")


def test_cpu_hardware_counts_the_device_as_host_memory():
    result = plan(SMALL, tokens_per_step=256, hardware="cpu", find_hiding=False)
    assert result["host_bytes"] == pytest.approx(result["host_pageable_bytes"])
    assert result["host_pinned_bytes"] == 0
    assert result["host_bytes"] > result["device_peak_bytes"] > 0
    assert not math.isnan(result["step_time_s"])

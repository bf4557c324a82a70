"""Preflight (horizon_triton/planning/preflight.py): an engine the machine cannot hold is refused before anything is
allocated, with the GiB needed and available; a step whose dry run exceeds the device's free memory likewise."""
import json
import re
import subprocess
import sys

import pytest
import torch

import horizon_triton as ht
from horizon_triton.planning import preflight

GiB = 2**30

REFUSE_70B = r"""
import json, resource, time
import horizon_triton as ht
cfg = ht.ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                     num_kv_heads=8)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before, start = peak(), time.perf_counter()
try:
    ht.Engine(cfg, ht.TrainConfig(device="cpu"))
    message = None
except MemoryError as e:
    message = str(e)
print(json.dumps({"message": message, "seconds": time.perf_counter() - start, "growth": peak() - before}))
"""


def test_llama3_70b_is_refused_on_this_machine_without_the_process_growing():
    out = subprocess.run([sys.executable, "-c", REFUSE_70B], capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    message = result["message"]
    assert message is not None, "the 70B engine was built"
    need, available = map(float, re.search(r"needs ([0-9.]+) GiB.* has ([0-9.]+) GiB available", message).groups())
    assert need > 900 > available                     # ~0.93 TiB of store (14 B/param) against a 24 GiB machine
    assert "preflight=False" in message
    assert result["growth"] < 64 * 2**20, result      # nothing of the model was allocated
    print(f"70B refused in {result['seconds']:.1f} s, peak RSS grew {result['growth'] / 2**20:.0f} MiB")


def test_small_host_memory_refuses_and_preflight_false_overrides(monkeypatch):
    cfg = ht.preset("tiny")
    monkeypatch.setattr(preflight, "host_memory_info", lambda: (2**20, 2**21))
    with pytest.raises(MemoryError, match=r"needs 0\.\d GiB of host memory .* has 0\.0 GiB available"):
        ht.Engine(cfg, ht.TrainConfig(device="cpu"))
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", preflight=False))
    assert engine.store.num_parameters() == cfg.num_parameters()


def test_step_whose_dry_run_exceeds_free_device_memory_is_refused_with_what_to_lower():
    cfg = ht.preset("tiny")
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu"))
    ids = torch.randint(0, cfg.vocab_size, (4, 64))
    mbs = [engine.prepare({"input_ids": ids, "labels": ids})]
    engine.device.mem_get_info = lambda: (10**12, 10**12)
    preflight.check_step(engine, mbs)                          # plenty free: passes
    engine.device.mem_get_info = lambda: (1000, 10**12)
    with pytest.raises(MemoryError, match=r"4x64 tokens .* needs 0\.\d GiB .* lower the tokens per micro-batch.*"
                                          r"checkpoint_budget_bytes"):
        preflight.check_step(engine, mbs)

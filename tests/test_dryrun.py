"""The dry run (horizon_triton/dryrun.py, kernel_models.py) against independent references: real CPU runs of the engine (bytes held,
bytes copied, peak RSS), FLOP formulas written from the model's shapes, brute-force attention masks, and the
Triton launch functions themselves (run by the interpreter) for what the kernel models allocate."""
import json
import math
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import horizon_triton as ht
from horizon_triton.dryrun import OpCounter, _tensors, dry_run, dry_run_shapes
from horizon_triton.kernel_models import TritonModels, causal_pairs, unmodelled_kernels
from horizon_triton.device import MetaDevice
from horizon_triton.kernels.reference import attention_mask
from horizon_triton.plan import HARDWARE

LLAMA3_70B = ht.ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                            num_heads=64, num_kv_heads=8, rope_theta=500000.0)
SHAPE_110B = ht.ModelConfig(vocab_size=151936, hidden_size=10240, intermediate_size=28672, num_layers=96,
                            num_heads=80, num_kv_heads=8)
TOKENS = 32768
GiB = 2**30


def _on(hardware: str, cfg, **kw):
    return dry_run(cfg, tokens_per_step=TOKENS, device_memory_bytes=HARDWARE[hardware]["device_memory_bytes"], **kw)


# ---- at full size ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, hardware", [(LLAMA3_70B, "h100"), (SHAPE_110B, "h200")], ids=["70B", "110B"])
def test_weights_cross_the_bus_twice_and_gradients_once_per_step(cfg, hardware):
    dry = _on(hardware, cfg)
    weights = 2 * dry.num_parameters                     # bf16 working copies
    assert 0.97 * 2 * weights <= dry.h2d_bytes <= 2 * weights, dry.h2d_bytes / weights
    assert dry.d2h_bytes == weights                      # bf16 gradients, once
    # 16 B/param in pinned blocks that PyTorch's caching host allocator rounds up to powers of two, per layer
    pow2 = lambda n: 2 ** math.ceil(math.log2(n))
    per_layer = [cfg.vocab_size * cfg.hidden_size] + [(dry.num_parameters - 2 * cfg.vocab_size * cfg.hidden_size
                                                       - cfg.hidden_size) // cfg.num_layers] * cfg.num_layers
    per_layer.append(cfg.vocab_size * cfg.hidden_size + cfg.hidden_size)
    assert dry.host_bytes == sum(3 * pow2(4 * n) + 2 * pow2(2 * n) for n in per_layer)
    assert dry.host_pinned_bytes == dry.host_bytes


@pytest.mark.parametrize("cfg, hardware", [(LLAMA3_70B, "h100"), (SHAPE_110B, "h200")], ids=["70B", "110B"])
def test_full_size_model_fits_its_card_with_default_settings(cfg, hardware):
    dry = _on(hardware, cfg)
    assert dry.device_peak_bytes <= HARDWARE[hardware]["device_memory_bytes"], dry.device_peak_bytes / GiB


def test_device_peak_does_not_grow_with_depth():
    shallow = _on("h100", ht.ModelConfig(**{**LLAMA3_70B.__dict__, "num_layers": 40}))
    deep = _on("h100", LLAMA3_70B)
    assert deep.device_peak_bytes <= 1.05 * shallow.device_peak_bytes, (deep.device_peak_bytes / GiB,
                                                                        shallow.device_peak_bytes / GiB)


# ---- FLOPs -------------------------------------------------------------------------------------------------
def _gemm_flops(cfg: ht.ModelConfig, tokens: int) -> float:
    """Forward 2·T per matrix parameter, the recompute the same without the down projection, backward 4·T; the
    head's fused cross-entropy three GEMMs of 2·T·H·V."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    qkv, o, mlp_in, down = H * (cfg.q_size + 2 * cfg.kv_size), cfg.q_size * H, 2 * I * H, I * H
    matrices = qkv + o + mlp_in + down
    per_layer = 2 * matrices + 2 * (matrices - down) + 4 * matrices
    return cfg.num_layers * per_layer * tokens + 6.0 * tokens * H * cfg.vocab_size


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gemm_flops_match_the_formula(backend):
    cfg = ht.ModelConfig(vocab_size=1000, hidden_size=256, intermediate_size=704, num_layers=3, num_heads=4,
                         num_kv_heads=2, model_type="qwen2", attention_bias=True)
    dry = dry_run(cfg, tokens_per_step=2 * 128, seq_len=128, kernel_backend=backend)
    gemm = sum(v for k, v in dry.flops.items() if k.startswith("gemm_"))
    if backend == "torch":   # the reference attention: batched matmuls over the whole S x S square, two in the
        B, S, Hq, D = 2, 128, cfg.num_heads, cfg.head_dim      # forward and in the recompute, five in the backward
        gemm -= cfg.num_layers * (2 + 2 + 5) * 2 * B * Hq * S * S * D
    assert gemm == pytest.approx(_gemm_flops(cfg, 256), rel=1e-9)


@pytest.mark.parametrize("window, doc_len", [(None, None), (48, None), (None, 40), (24, 40)])
def test_attention_flops_count_exactly_the_pairs_the_mask_allows(window, doc_len):
    cfg = ht.ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                         num_kv_heads=2, model_type="mistral", sliding_window=window)
    B, S = 3, 100
    dry = dry_run(cfg, tokens_per_step=B * S, seq_len=S, doc_len=doc_len)
    docs = None
    if doc_len is not None:
        docs = (torch.arange(S) // doc_len).expand(B, S)
    allowed = int(attention_mask(S, docs, window, "cpu", B).sum())          # brute force over the S x S mask
    per_pass = 4 * cfg.head_dim * cfg.num_heads * allowed * cfg.num_layers
    assert dry.flops["attention_fwd"] == 2 * per_pass                      # forward and the recompute
    assert dry.flops["attention_bwd"] == 2.5 * per_pass


def test_causal_pairs_formula_matches_the_mask():
    for n in (1, 2, 7, 64):
        for window in (None, 1, 3, 64, 100):
            assert causal_pairs(n, window) == int(attention_mask(n, None, window, "cpu", 1).sum()), (n, window)


# ---- against a real CPU run ------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [None, 40_000])
def test_held_bytes_and_bus_bytes_match_a_real_cpu_step(budget):
    cfg = ht.ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                         num_kv_heads=2)
    train_cfg = ht.TrainConfig(device="cpu", grad_accum_steps=2, checkpoint_budget_bytes=budget)
    shapes = [(2, 48), (2, 48)]
    engine = ht.Engine(cfg, train_cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    real = engine.fit([{"input_ids": ids, "labels": ids}] * 2)[0]
    dry = dry_run_shapes(cfg, train_cfg, shapes, kernel_backend="torch", device_memory_bytes=2**34,
                         pin_memory=False)
    assert dry.device_held_peak_bytes == pytest.approx(real["device_peak_bytes"], rel=0.02)
    assert (dry.h2d_bytes, dry.d2h_bytes) == (real["h2d_bytes"], real["d2h_bytes"])
    if budget is not None:      # offloaded checkpoints crossed the bus and took host buffers
        assert dry.host_checkpoint_bytes > 0 and real["h2d_bytes"] > 2 * engine.store.nbytes() / 16 * 2 * 0.5
    bus = {"h2d": 0, "d2h": 0}  # the op counter's own view of every copy agrees with the scheduler's meter
    for item in dry.timeline:
        if item[0] == "task":
            for kind in bus:
                bus[kind] += item[2].get(kind, [0, 0])[1]
    assert (bus["h2d"], bus["d2h"]) == (dry.h2d_bytes, dry.d2h_bytes)


# Trains the 200M model of tests/host_memory_probe.py for two steps and prints the growth of anonymous resident memory
# (RssAnon, sampled every 2 ms): unlike ru_maxrss it does not shrink when a loaded machine evicts the pages of the
# libraries mapped before the baseline.
ANON_PROBE = r"""
import json, threading, time, torch
import horizon_triton as ht

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
cfg = ht.ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16,
                     num_kv_heads=4)
ids = torch.randint(0, cfg.vocab_size, (1, 32))
before = anon()
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
ht.Engine(cfg, ht.TrainConfig(device="cpu", lr=1e-4)).fit([{"input_ids": ids, "labels": ids}] * 2)
done.set()
sampler.join()
print(json.dumps({"growth": max(peak[0], anon()) - before}))
"""


@pytest.mark.slow
def test_predicted_host_bytes_match_peak_resident_memory_of_a_real_run():
    """~200M parameters on the CPU device, in a child process: the dry run's host bytes (the store, and the CPU
    device's tensors, which are host memory too) against the growth of its resident memory."""
    out = subprocess.run([sys.executable, "-c", ANON_PROBE], capture_output=True, text=True, check=True, timeout=600)
    measured = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    cfg = ht.ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16,
                         num_kv_heads=4)
    dry = dry_run(cfg, ht.TrainConfig(device="cpu"), tokens_per_step=32, kernel_backend="torch",
                  device_memory_bytes=2**34, pin_memory=False)
    predicted = dry.host_bytes + dry.device_peak_bytes
    assert predicted == pytest.approx(measured, rel=0.05), (predicted / 1e9, measured / 1e9)


# ---- the kernel models -------------------------------------------------------------------------------------
def test_every_triton_kernel_op_has_a_model():
    assert unmodelled_kernels() == []


class _Allocations(TorchDispatchMode):
    """(bytes, dtype) of every storage a call creates (kept alive, so that no address is reused and missed)."""

    def __init__(self):
        super().__init__()
        self.made, self._seen, self._alive = [], set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            key = t.untyped_storage()._cdata
            if key not in inputs and key not in self._seen:
                self._seen.add(key)
                self._alive.append(t.untyped_storage())
                # the launchers' input checks make bool masks; the interpreter, empty placeholders
                if t.dtype not in (torch.bool, torch.uint8) and t.untyped_storage().nbytes() > 0 and t.dim() > 0:
                    self.made.append((t.untyped_storage().nbytes(), t.dtype))
        return out


def _kernel_calls():
    """(op name, args) on small odd shapes; the same call runs the Triton launcher (interpreter) and the model."""
    T, H, N, V, B, S, Hq, Hkv, D, I = 37, 64, 96, 300, 1, 37, 4, 2, 32, 80
    bf = torch.bfloat16
    x, w, g = torch.randn(T, H, dtype=bf), torch.randn(N, H, dtype=bf), torch.ones(H, dtype=bf)
    rstd = torch.rand(T) + 0.5
    q, k, v = torch.randn(B, S, Hq, D, dtype=bf), torch.randn(B, S, Hkv, D, dtype=bf), torch.randn(B, S, Hkv, D, dtype=bf)
    o, lse = torch.randn(B, S, Hq, D, dtype=bf), torch.randn(B, Hq, S)
    cos, sin = torch.randn(T, D), torch.randn(T, D)
    return [
        ("rmsnorm_forward", (x, g, 1e-6)),
        ("rmsnorm_backward", (x, x, g, rstd, torch.zeros(H))),
        ("rmsnorm_matmul_forward", (x, g, w, 1e-6)),
        ("rmsnorm_matmul_backward", (torch.randn(T, N, dtype=bf), x, g, w, rstd, torch.zeros(N, H), torch.zeros(H))),
        ("rope_forward_", (torch.randn(T, Hq, D, dtype=bf), cos, sin)),
        ("swiglu_forward", (torch.randn(T, 2 * I, dtype=bf),)),
        ("swiglu_backward", (torch.randn(T, I, dtype=bf), torch.randn(T, 2 * I, dtype=bf))),
        ("attention_forward", (q, k, v, None, D ** -0.5, None)),
        ("attention_backward", (o, q, k, v, o, lse, None, D ** -0.5, None)),
        ("linear_cross_entropy", (x, torch.randn(V, H, dtype=bf), torch.randint(0, V, (T,)), torch.zeros(V, H),
                                  1.0 / T, 16)),
    ]


def _meta(tree):
    if isinstance(tree, torch.Tensor):
        return tree.to("meta")
    if isinstance(tree, tuple):
        return tuple(_meta(t) for t in tree)
    return tree


@pytest.mark.parametrize("name, args", _kernel_calls(), ids=[c[0] for c in _kernel_calls()])
def test_kernel_models_allocate_what_the_launchers_allocate(name, args, monkeypatch):
    import importlib

    from horizon_triton import kernel_models
    from horizon_triton.ops import KERNEL_FAMILY
    # the rmsnorm backward's persistent grid is 4 programs per SM on a GPU, 4 in all off it
    monkeypatch.setattr(kernel_models, "HOPPER_SMS", 1)
    launcher = getattr(importlib.import_module(f"horizon_triton.kernels.{KERNEL_FAMILY[name]}"), name)
    with _Allocations() as real:
        launcher(*args)
    dev = MetaDevice(None, "triton", 2**30)
    counter = OpCounter(dev)
    model, meta_args = getattr(TritonModels(counter, None), name), _meta(args)
    with counter, _Allocations() as modelled:
        model(*meta_args)
    assert sorted(modelled.made, key=str) == sorted(real.made, key=str)
    assert dev.timeline and all(n >= 0 for item in dev.timeline for _, n in item[2].values())

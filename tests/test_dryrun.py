"""The dry run (horizon_triton/planning/dryrun.py, kernel_models.py) against independent references: real CPU runs of the engine (bytes held,
bytes copied, peak RSS), FLOP formulas written from the model's shapes, brute-force attention masks, and the
Triton launch functions themselves (run by the interpreter) for what the kernel models allocate."""
import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import horizon_triton as ht
from horizon_triton.planning.dryrun import OpCounter, _tensors, dry_run, dry_run_shapes
from horizon_triton.planning.kernel_models import TritonModels, causal_pairs, unmodelled_kernels
from horizon_triton.devices.device import MetaDevice
from horizon_triton.kernels import cross_entropy, reference
from horizon_triton.kernels.reference import attention_mask
from horizon_triton.planning.plan import HARDWARE

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
    """Bus bytes from the design (scheduler.py), bf16 working weights and gradients: every decoder layer crosses in
    for the forward and again for the recompute; the head, larger than a slot (the largest decoder layer) at these
    vocabularies, streams in vocabulary chunks through two passes (statistics, then gradients), so it crosses in
    twice as well, each chunk with the final norm beside its rows; the embedding table never does, only the
    step's gathered rows (one per distinct token id) and each token's row index (int64). Gradients cross out
    once: each decoder layer's, the head's and the gathered rows'. Offloaded activation checkpoints cross out and
    back in, whole ones."""
    dry = _on(hardware, cfg)
    H, V, b = cfg.hidden_size, cfg.vocab_size, 2
    layer = (dry.num_parameters - 2 * V * H - H) // cfg.num_layers          # a slot holds one decoder layer
    chunks = math.ceil(V / ((layer - H) // H))                             # lm_head rows and the norm a slot
    assert chunks > 1                                                     # the two-pass head
    decoder, head = layer * cfg.num_layers * b, (V * H + H) * b
    rows = min(TOKENS, V) * H * b                         # the dry run's ids: every token a distinct one
    offloaded = dry.d2h_bytes - (decoder + head + rows)
    assert offloaded >= 0 and offloaded % (TOKENS * H * b) == 0
    assert dry.h2d_bytes == 2 * decoder + 2 * (V * H + chunks * H) * b + rows + 8 * TOKENS + offloaded
    weights = 2 * dry.num_parameters                      # bf16 working copies, the embedding table included
    assert 1.9 < (dry.h2d_bytes - offloaded) / weights < 2.0
    # 14 B/param (bf16 working weights + int16 low halves, fp32 moments, bf16 gradients), every buffer at its
    # exact size in whole pages (the store registers the pinned ones itself: no power-of-two rounding)
    pow2 = lambda n: 2 ** math.ceil(math.log2(n))
    page = lambda n: -(-n // 4096) * 4096
    per_layer = [cfg.vocab_size * cfg.hidden_size] + [(dry.num_parameters - 2 * cfg.vocab_size * cfg.hidden_size
                                                       - cfg.hidden_size) // cfg.num_layers] * cfg.num_layers
    per_layer.append(cfg.vocab_size * cfg.hidden_size + cfg.hidden_size)
    assert sum(n for _, _, n in dry.host_store) == sum(3 * page(2 * n) + 2 * page(4 * n) for n in per_layer)
    # and the step's pinned buffers at their peak: the offloaded checkpoints (all out at the end of the forward),
    # or the gathered rows' before them, their gradient's after the checkpoints came back
    assert max(offloaded, pow2(rows)) <= dry.host_step_bytes <= offloaded + 2 * pow2(rows)
    assert dry.host_bytes == sum(n for _, _, n in dry.host_store) + dry.host_step_bytes
    # pinned: only what crosses the bus (working weights, gradients) and the step's staging buffers
    assert {kind for kind, pinned, _ in dry.host_store if pinned} == {"working", "grad"}
    assert dry.host_pinned_bytes == sum(2 * page(2 * n) for n in per_layer) + dry.host_step_bytes


@pytest.mark.parametrize("cfg, hardware", [(LLAMA3_70B, "h100"), (SHAPE_110B, "h200")], ids=["70B", "110B"])
def test_full_size_model_fits_its_card_with_default_settings(cfg, hardware):
    dry = _on(hardware, cfg)
    assert dry.device_peak_bytes <= HARDWARE[hardware]["device_memory_bytes"], dry.device_peak_bytes / GiB


def test_device_peak_does_not_grow_with_depth():
    """The default checkpoint budget keeps checkpoints on the device while free memory lasts (scheduler.
    default_checkpoint_budget), so the peak grows with depth only until the budget is full, then stays: 40 of
    Llama-3-70B's layers at 32K tokens keep all 40 checkpoints (20 GiB) on an 80 GB card, 80 and 120 layers fill
    the budget and offload the rest. What is not a kept checkpoint (slots, accumulators, the working set of a layer
    and the head) is the same at every depth."""
    shallow, deep, deeper = (_on("h100", ht.ModelConfig(**{**LLAMA3_70B.__dict__, "num_layers": n}))
                             for n in (40, 80, 120))
    assert shallow.d2h_bytes - deep.d2h_bytes / 2 < 2**30            # 40 layers offload no checkpoint...
    assert deep.device_peak_bytes > shallow.device_peak_bytes        # ...so they keep fewer on the device
    assert deeper.device_peak_bytes <= 1.05 * deep.device_peak_bytes <= 1.05 * HARDWARE["h100"]["device_memory_bytes"]
    working = [d.device_peak_bytes - d.device_held_at_peak for d in (shallow, deep, deeper)]
    assert max(working) <= 1.01 * min(working), [w / GiB for w in working]


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
    if backend == "torch":   # standing for the CPU device: the decoder's weight gradients are fp32 GEMMs there
        cpu = dry_run(cfg, tokens_per_step=2 * 128, seq_len=128, kernel_backend=backend, pin_memory=False)
        H, I = cfg.hidden_size, cfg.intermediate_size
        matrices = H * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * H + 3 * I * H
        weight_grads = 2.0 * 256 * matrices * cfg.num_layers
        assert cpu.flops["gemm_float32"] - dry.flops["gemm_float32"] == pytest.approx(weight_grads, rel=1e-9)
        assert dry.flops["gemm_bfloat16"] - cpu.flops["gemm_bfloat16"] == pytest.approx(weight_grads, rel=1e-9)


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
    # the dry run's ids: every token of the step a distinct id (the most embedding rows a step gathers), in order
    ids = torch.arange(2 * 2 * 48).view(2, 2, 48) % cfg.vocab_size
    real = engine.fit([{"input_ids": ids[m], "labels": ids[m]} for m in range(2)])[0]
    dry = dry_run_shapes(cfg, train_cfg, shapes, kernel_backend="torch", device_memory_bytes=2**34,
                         pin_memory=False)
    assert dry.device_held_peak_bytes == pytest.approx(real["device_peak_bytes"], rel=0.02)
    assert (dry.h2d_bytes, dry.d2h_bytes) == (real["h2d_bytes"], real["d2h_bytes"])
    if budget is not None:      # offloaded checkpoints crossed the bus and took host buffers
        kept = dry_run_shapes(cfg, replace(train_cfg, checkpoint_budget_bytes=None), shapes, kernel_backend="torch",
                              device_memory_bytes=2**34, pin_memory=False)
        assert dry.host_step_bytes > kept.host_step_bytes and real["h2d_bytes"] > kept.h2d_bytes
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
    E, top_k, Im = 8, 2, 40                                   # MoE: expert 7 gets no token
    M, logits = T * top_k, torch.randn(T, E, dtype=bf)
    ids = ((torch.arange(T)[:, None] * 3 + torch.arange(top_k)) % 7).to(torch.int32)
    order, offsets = reference.moe_permute(ids, E)
    w_gu, w_d = torch.randn(E, 2 * Im, H, dtype=bf), torch.randn(E, H, Im, dtype=bf)
    moe = [
        ("moe_softmax_topk_forward", (logits, top_k, True)),
        ("moe_softmax_topk_backward", (torch.randn(T, top_k), logits, ids, True)),
        ("moe_sigmoid_topk_forward", (logits, torch.zeros(E), top_k, 4, 2, True, 2.5)),
        ("moe_sigmoid_topk_backward", (torch.randn(T, top_k), logits, ids, True, 2.5)),
        ("moe_permute", (ids, E)),
        ("moe_gate_up_forward", (x, order, offsets, top_k, w_gu, torch.randn(E, 2 * Im, dtype=bf))),
        ("moe_gate_up_backward", (torch.randn(M, 2 * Im, dtype=bf), x, order, offsets, top_k, w_gu,
                                  torch.zeros(E, 2 * Im, H), torch.zeros(E, 2 * Im))),
        ("moe_down_forward", (torch.randn(M, Im, dtype=bf), order, offsets, w_d, None)),
        ("moe_down_backward", (torch.randn(M, H, dtype=bf), torch.randn(M, Im, dtype=bf), order, offsets, w_d,
                               torch.zeros(E, H, Im), None)),
        ("moe_combine_forward", (torch.randn(M, H, dtype=bf), torch.rand(T, top_k))),
        ("moe_combine_backward", (x, torch.randn(M, H, dtype=bf), torch.rand(T, top_k))),
        ("clamped_swiglu_forward", (torch.randn(T, 2 * I, dtype=bf), 1.702, 7.0)),
        ("clamped_swiglu_backward", (torch.randn(T, I, dtype=bf), torch.randn(T, 2 * I, dtype=bf), 1.702, 7.0)),
    ]
    return [*moe, 
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
        # lm_head rows [100, 200) of a vocabulary of V, in token chunks of 16 (the last one short)
        ("cross_entropy_chunk_stats_", (x, torch.randn(N, H, dtype=bf), torch.randint(0, V, (T,)), 100,
                                        torch.full((T,), -1e4), torch.ones(T), torch.zeros(T), 16)),
        ("cross_entropy_chunk_backward", (x, torch.randn(N, H, dtype=bf), torch.randint(0, V, (T,)), 100,
                                          torch.rand(T) + 5, 1.0 / T, torch.zeros(T, H), torch.zeros(N, H), 16)),
        ("cross_entropy_chunk_backward", (x, torch.randn(N, H, dtype=bf), torch.randint(0, V, (T,)), 100,
                                          torch.rand(T) + 5, torch.randn(T), torch.zeros(T, H), torch.zeros(N, H), 16)),
    ]


def _unseen(fn):
    """fn run with the dispatch modes of the test switched off (its allocations are not counted)."""
    def call(*args):
        with _disable_current_modes():
            return fn(*args)
    return call


def _meta(tree):
    if isinstance(tree, torch.Tensor):
        return tree.to("meta")
    if isinstance(tree, tuple):
        return tuple(_meta(t) for t in tree)
    return tree


@pytest.mark.parametrize("name, args", _kernel_calls(), ids=[c[0] for c in _kernel_calls()])
def test_kernel_models_allocate_what_the_launchers_allocate(name, args, monkeypatch):
    import importlib

    from horizon_triton.planning import kernel_models
    from horizon_triton.models.ops import KERNEL_FAMILY
    # the rmsnorm backward's persistent grid is 4 programs per SM on a GPU, 4 in all off it
    monkeypatch.setattr(kernel_models, "HOPPER_SMS", 1)
    # bf16 operands into an fp32 accumulator: on CUDA one addmm into it (no allocation); on CPU, which has no
    # mixed-dtype GEMM, fp32 copies of operand chunks, which the models (of the CUDA path) do not make
    monkeypatch.setattr(cross_entropy, "matmul_accumulate_", _unseen(reference.matmul_accumulate_))
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

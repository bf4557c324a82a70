"""The dry run, preflight and plan() of generic models (transformers' own decoder layers) at full size on the meta
device: host bytes against parameters × bytes per parameter (the parameters counted from the skeleton's own
modules), device peaks against the cards, and the measured backward bytes of a layer against what the same layer
holds on real CPU tensors and what autograd saves."""
import functools
import math
import weakref
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import horizon_triton as ht
from horizon_triton.kernels import reference
from horizon_triton.models.generic.config import GenericConfig
from horizon_triton.models.generic.experts import Experts, experts_on
from horizon_triton.models.generic.footprint import backward_bytes
from horizon_triton.models.generic.template import GenericTemplate
from horizon_triton.models.generic.weights import layer_layouts
from horizon_triton.planning.dryrun import dry_run, fixed_device_bytes
from horizon_triton.planning.known_models import KNOWN_MODELS, known_model
from horizon_triton.planning.plan import HARDWARE, plan
from generic_models import COMMON, FAMILIES

GiB = 2**30
SEQ = 4096
# published totals (model cards; Gemma 3: 27.4B with its 0.4B vision tower, which is not trained here; DeepSeek-V3:
# 671B without its 14B multi-token-prediction layer, which transformers does not build); the Qwen3.5 entries are
# written from memory (known_models.py): only near their published 122B and 397B
PUBLISHED = {"gpt-oss-120b": (116.83e9, 0.001), "qwen3-235b-a22b": (235.09e9, 0.001),
             "gemma-3-27b": (27.0e9, 0.002), "qwen3.5-122b-a10b": (122e9, 0.01), "qwen3.5-397b-a17b": (397e9, 0.01),
             "deepseek-v3": (671e9, 0.001)}
# published active parameters of the MoE models (the names' A22B, A17B; DeepSeek-V3's 37B; gpt-oss-120b's 5.13B,
# counted without the input embedding as its model card does), to the precision the names give
ACTIVE = {"gpt-oss-120b": (5.13e9, 0.01, False), "qwen3-235b-a22b": (22e9, 0.025, True),
          "qwen3.5-397b-a17b": (17e9, 0.025, True), "deepseek-v3": (37e9, 0.025, True)}


@functools.lru_cache(maxsize=None)
def _dry(name: str, rows: int, hardware: str):
    return dry_run(known_model(name), tokens_per_step=rows * SEQ, seq_len=SEQ,
                   device_memory_bytes=HARDWARE[hardware]["device_memory_bytes"])


def test_known_models_have_their_published_sizes():
    assert set(PUBLISHED) == set(KNOWN_MODELS)
    for name, (total, within) in PUBLISHED.items():
        n = known_model(name).num_parameters()
        assert abs(n / total - 1) < within, (name, n)
    with pytest.raises(ValueError, match="unknown model"):
        known_model("gpt-5")


@pytest.mark.parametrize("name", list(ACTIVE))
def test_known_moe_models_have_their_published_active_parameters(name):
    """Total less the experts a token is not routed to (all experts' parameters × (1 − k/E), from the skeleton's
    layers), with or without the input embedding as each model card counts."""
    total, within, with_embedding = ACTIVE[name]
    hf = known_model(name).hf
    active = _active_parameters(name) + (hf.vocab_size * hf.hidden_size if with_embedding else 0)
    assert abs(active / total - 1) < within, (name, active)


@pytest.mark.parametrize("name", list(KNOWN_MODELS))
def test_host_store_is_parameters_times_bytes_per_parameter(name):
    """14 B/param in bf16 (bf16 working weights + int16 low halves + bf16 gradients, fp32 moments), 16 in fp32,
    8 with 8-bit moments (+ their fp32 scale per 256 values): each buffer of each layer (embedding, decoder
    layers, head) at its size in whole pages; the parameters of each from the skeleton (layer_layouts)."""
    cfg = known_model(name)
    sizes = [layout.numel for layout in layer_layouts(cfg)]
    page = lambda n: -(-n // 4096) * 4096
    backend, memory = "triton", HARDWARE["h100"]["device_memory_bytes"]
    for train, want in ((ht.TrainConfig(), lambda n: 3 * page(2 * n) + 2 * page(4 * n)),
                        (ht.TrainConfig(compute_dtype="float32"), lambda n: 4 * page(4 * n))):
        _, allocations = fixed_device_bytes(cfg, train, backend, memory, True)
        assert sum(a.reserved_bytes for a in allocations) == sum(want(n) for n in sizes)
    _, allocations = fixed_device_bytes(cfg, ht.TrainConfig(optimizer_states="8bit"), backend, memory, True)
    per_param = sum(a.reserved_bytes for a in allocations) / sum(sizes)
    assert 8 < per_param < 8 + 2 * 4 / 256 + 0.002, per_param


# too large for an H100 in a full fine-tune: a decoder layer's two bf16 slots and two fp32 accumulators (12 B per
# parameter of the largest layer: 6.6B in Qwen3.5-397B, 11B in DeepSeek-V3, which passes an H200 too); LoRA fits
LORA_ONLY = ("qwen3.5-397b-a17b", "deepseek-v3")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "qwen3.5-122b-a10b" else n
                                  for n in KNOWN_MODELS if n not in LORA_ONLY])   # Qwen3.5: its delta rule, ~50 s
def test_dry_run_step_at_full_size(name):
    """One step of 1 × 4096 tokens on an H100 and 8 × 4096 on an H200: the store's bytes and the step's host
    buffers make the host bytes; the device peak within the card; the weights cross in twice (forward,
    recompute) and the gradients out once, as for the hand-written template."""
    # Qwen3.5's delta rule runs as transformers' torch reference on the meta device (~50 s a step on two cores):
    # its H200 step is in perf/RESULTS.md, computed once, not here
    for rows, hardware in ((1, "h100"),) + (((8, "h200"),) if not name.startswith("qwen3.5") else ()):
        dry = _dry(name, rows, hardware)
        assert dry.num_parameters == known_model(name).num_parameters()
        assert dry.host_bytes == sum(n for _, _, n in dry.host_store) + dry.host_step_bytes
        assert 14 <= sum(n for _, _, n in dry.host_store) / dry.num_parameters < 14.001
        assert dry.device_fixed_bytes < dry.device_peak_bytes <= HARDWARE[hardware]["device_memory_bytes"], \
            dry.device_peak_bytes / GiB
        weights = 2 * dry.num_parameters
        assert 1.9 < dry.h2d_bytes / weights and dry.d2h_bytes >= weights * 0.95
        assert dry.flops["gemm_bfloat16"] > 6 * 0.9 * _active_parameters(name) * rows * SEQ


@pytest.mark.slow
@pytest.mark.parametrize("name", LORA_ONLY)
def test_the_largest_moe_models_fit_one_card_with_lora_only(name):
    """Qwen3.5-397B-A17B and DeepSeek-V3 (61 layers of 256 experts, MLA, 3 dense first layers) at full size, 1 × 4096
    tokens: the full fine-tune's device bytes pass an H100, LoRA on o_proj (rank 16) fits one with a store of
    2 B per base parameter and the adapters' 16; the base crosses in twice, and none of its gradients comes out."""
    cfg = known_model(name)
    memory = HARDWARE["h100"]["device_memory_bytes"]      # DeepSeek-V3 passes it before any step, Qwen3.5 in it
    assert fixed_device_bytes(cfg, ht.TrainConfig(), "triton", memory, True)[0] > memory \
        or _dry(name, 1, "h100").device_peak_bytes > memory
    from horizon_triton.models.family import adapter_layouts
    from horizon_triton.objectives.lora import spec_of
    train = ht.TrainConfig(lora_rank=16, lora_targets=("o_proj",))
    lora = dry_run(cfg, train, tokens_per_step=SEQ, seq_len=SEQ,
                   device_memory_bytes=HARDWARE["h100"]["device_memory_bytes"])
    P, store = cfg.num_parameters(), sum(n for _, _, n in lora.host_store)
    adapters = sum(layout.numel for layout in adapter_layouts(cfg, spec_of(train)))
    assert 0 < adapters < 0.001 * P and store == pytest.approx(2 * P + 16 * adapters, rel=1e-4)
    assert lora.device_peak_bytes <= HARDWARE["h100"]["device_memory_bytes"]
    # out: the adapters' fp32 gradients and offloaded checkpoints, no gradient of the base (a full fine-tune's 2P)
    assert 1.9 < lora.h2d_bytes / (2 * P) < 2.1 and 4 * adapters <= lora.d2h_bytes < 0.01 * 2 * P


def _active_parameters(name: str) -> float:
    """Parameters one token passes through (the embedding row apart): decoder layers with only the routed
    experts, and the head; a lower bound for the FLOP check."""
    from horizon_triton.models.generic.skeleton import skeleton
    hf = known_model(name).hf
    total = known_model(name).num_parameters() - hf.vocab_size * hf.hidden_size
    experts = getattr(hf, "num_local_experts", None) or getattr(hf, "num_experts", None) \
        or getattr(hf, "n_routed_experts", None)
    if not experts:
        return total
    routed = hf.num_experts_per_tok / experts
    expert_params = sum(p.numel() for layer in skeleton(known_model(name)).layers
                        for n, p in layer.named_parameters() if ".experts." in f".{n}")
    return total - expert_params * (1 - routed)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_plan_runs_every_tiny_family(model_type):
    """plan() (the dry run on the meta device, its checkpoint budget's footprint included) of every family the
    generic template trains: MLA's value head dim (DeepSeek-V3), saved router biases (GLM-4-MoE, DeepSeek-V3), the
    soft-capped torch head (Gemma 2) each once broke it. Its host bytes are the store's and the step's buffers."""
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type]})
    cfg = GenericConfig.from_hf(config)
    result = plan(cfg, tokens_per_step=64, seq_len=32, find_hiding=False)
    assert result["num_parameters"] == cfg.num_parameters()
    assert result["fits_device"] and result["device_peak_bytes"] > result["device_fixed_bytes"] > 0
    assert sum(result["host_store_bytes"].values()) <= result["host_bytes"]


def test_plan_reports_tokens_to_hide_transfers():
    """plan() of a generic model fits its card and reports the fewest tokens per step (whole rows) whose copies
    hide under compute and the AdamW (test_plan checks the search itself against plans on either side)."""
    cfg = known_model("gemma-3-27b")
    result = plan(cfg, tokens_per_step=SEQ, seq_len=SEQ, hardware="h100")
    assert result["fits_device"] and result["num_parameters"] == cfg.num_parameters()
    hide = result["tokens_to_hide_transfers"]
    assert hide is not None and hide % SEQ == 0


# ---- the measured backward bytes of a layer -----------------------------------------------------------------
class _Live(TorchDispatchMode):
    """Bytes of the storages made under it still alive, and their peak (real CPU tensors)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen \
                    and t.untyped_storage().nbytes():
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                self.seen.add(key)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, n)
        return out

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n


TINY = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=64, max_position_embeddings=1024)


@pytest.mark.parametrize("model_type, extra", [
    ("llama", {}), ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)),
    ("gemma2", dict(sliding_window=64))], ids=["llama", "qwen3_moe", "gemma2"])
def test_backward_bytes_are_what_the_layer_holds_on_the_cpu(model_type, extra):
    """backward_bytes (measured on the meta device, attention as CUDA's fused kernels) against the same layer's
    recompute + backward on real CPU tensors (whose sdpa is a fused kernel too, keeping no [S, S] scores where
    no mask is given): within 3%; and at least what autograd saves of the recompute (its own storages: not the
    layer's input, weights or layer inputs)."""
    cfg = GenericConfig.from_hf(transformers.AutoConfig.for_model(model_type, **TINY, **extra))
    rows, seq, dtype = 2, 256, torch.bfloat16
    measured = backward_bytes(cfg, dtype, rows, seq)
    tpl = GenericTemplate(cfg, torch.device("cpu"), dtype)
    mb = SimpleNamespace(shape=(rows, seq), doc_ids=None, model_inputs=None, attention_mask=None,
                         position_ids=torch.arange(seq).expand(rows, seq))
    inputs = tpl.layer_inputs(mb)
    torch.manual_seed(0)
    cpu_peak = saved_peak = 0
    for i, layer in enumerate(tpl.layers):
        w = {n: torch.randn(p.shape, dtype=dtype) * 0.05 for n, p in layer.named_parameters()}
        g = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in layer.named_parameters()}
        x, d_out = (torch.randn(rows * seq, cfg.hidden_size, dtype=dtype) for _ in range(2))
        given = {t.untyped_storage().data_ptr() for t in _all_tensors((w, g, x, d_out, inputs))}
        saved: dict[int, int] = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in given:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        # MoE experts on the references, as backward_bytes measures them (they are what the torch backend runs)
        with _Live() as live, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                experts_on(Experts(reference, tpl.experts_fallback)):
            tpl.decoder_backward(None, cfg, w, g, x, mb, d_out, i + 1)
        cpu_peak, saved_peak = max(cpu_peak, live.peak), max(saved_peak, sum(saved.values()))
    assert abs(measured / cpu_peak - 1) < 0.03, (measured, cpu_peak)
    assert measured >= saved_peak > 0, (measured, saved_peak)


def _all_tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _all_tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _all_tensors(item)


def test_meta_layer_inputs_have_the_cpu_shapes_and_sharing():
    """On the meta device the layer inputs are recorded on the CPU from the micro-batch's host layout and become
    meta tensors of the same shapes, dtypes and strides; tensors that share a storage on the CPU (one rotary
    table for every layer of a kind) share one on meta."""
    cfg = GenericConfig.from_hf(transformers.AutoConfig.for_model("gemma2", **TINY, sliding_window=64))
    rows, seq = 2, 128
    pos = torch.arange(seq).expand(rows, seq)
    cpu = GenericTemplate(cfg, torch.device("cpu"), torch.bfloat16).layer_inputs(
        SimpleNamespace(shape=(rows, seq), doc_ids=None, model_inputs=None, attention_mask=None, position_ids=pos))
    meta = GenericTemplate(cfg, torch.device("meta"), torch.bfloat16).layer_inputs(
        SimpleNamespace(shape=(rows, seq), model_inputs=None, host_layout=(pos, None, None)))
    a, b = list(_all_tensors(cpu)), list(_all_tensors(meta))
    assert len(a) == len(b) > 0 and all(t.device.type == "meta" for t in b)
    assert [(t.shape, t.dtype, t.stride()) for t in a] == [(t.shape, t.dtype, t.stride()) for t in b]
    same = lambda ts: [[s.untyped_storage()._cdata == t.untyped_storage()._cdata for t in ts] for s in ts]
    assert same(a) == same(b)
    assert math.prod(a[0].shape) > 0


def test_preflight_refuses_a_full_size_generic_model_with_the_bytes_it_needs():
    """The preflight of an Engine: the store of Qwen3-235B-A22B (14 B/param, ~3 TiB) is refused on this machine
    before anything is allocated, with the GiB it needs."""
    cfg = known_model("qwen3-235b-a22b")
    with pytest.raises(MemoryError, match=r"needs 30[0-9]{2}\.\d+ GiB of host memory for a 235\.09B-parameter"):
        ht.Engine(cfg, ht.TrainConfig(device="cpu"))


def test_cli_plan_of_a_generic_model_and_no_deepest_variant(tmp_path, capsys):
    """`horizon-triton plan` on a generic model's directory prints its plan (at its own depth: a deeper variant of a
    model with per-layer kinds is not defined, and largest_model says so)."""
    from horizon_triton import cli
    from horizon_triton.planning.plan import largest_model
    from generic_models import make_generic_model
    make_generic_model("qwen3_moe", tmp_path / "moe")
    assert cli.main(["plan", "--model", str(tmp_path / "moe"), "--tokens-per-step", "256", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "qwen3_moe" in out and "device peak" in out and "host memory" in out
    with pytest.raises(ValueError, match="generic layer template"):
        largest_model(ht.ModelConfig.from_pretrained(tmp_path / "moe"), tokens_per_step=256, host_memory_bytes=10**10)

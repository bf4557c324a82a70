"""Host store: host RAM is the authoritative home of every parameter, gradient and optimizer state.

The model is a list of layers: the embedding, the decoder layers, the head (final norm, and lm_head unless it is
tied to the embedding). Each layer owns one contiguous flat buffer per kind:

    working  bf16 (or fp32)  what streams to the compute device; in fp32 mode it *is* the master buffer
    master   fp32            the optimizer's weights
    exp_avg, exp_avg_sq fp32 AdamW moments
    grad     bf16 (or fp32)  the step's gradient, written once per step from the device's fp32 accumulator

That is 2 + 4 + 4 + 4 + 2 = 16 bytes per parameter in bf16 mode (4 + 4 + 4 + 4 in fp32 mode). Every parameter
is a view into these buffers; nothing else holds a copy of the model.

Inside a layer, parameters that take weight decay (2+ dimensions) come first, so one AdamW call covers them and
a second the rest; q/k/v rows are adjacent (one fused [q+2kv, H] matrix), as are gate/up and the q/k/v biases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

INIT_STD = 0.02  # transformers' initializer_range default for these families


@dataclass(frozen=True)
class Param:
    key: str               # short name inside the layer ("q", "gate", "input_norm", ...)
    hf_name: str           # full Hugging Face tensor name
    shape: tuple[int, ...]
    offset: int            # element offset inside the layer's flat buffer

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def decay(self) -> bool:
        return len(self.shape) >= 2


# Fused views: adjacent parameters read as one tensor (key -> (first member, last member)).
FUSED = {"qkv": ("q", "v"), "gate_up": ("gate", "up"), "qkv_bias": ("q_bias", "v_bias")}


@dataclass(frozen=True)
class LayerLayout:
    name: str                        # "embed", "layers.3", "head"
    params: tuple[Param, ...]
    numel: int
    decay_numel: int                 # parameters [0, decay_numel) take weight decay

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter and fused views of one of this layer's flat buffers (any dtype, any device)."""
        if flat.numel() != self.numel:
            raise ValueError(f"{self.name}: buffer has {flat.numel()} elements, layout needs {self.numel}")
        out = {p.key: flat[p.offset:p.offset + p.numel].view(p.shape) for p in self.params}
        by_key = {p.key: p for p in self.params}
        for fused, (first, last) in FUSED.items():
            if first in by_key:
                a, b = by_key[first], by_key[last]
                rows = (b.offset + b.numel - a.offset) // (a.numel // a.shape[0])
                out[fused] = flat[a.offset:b.offset + b.numel].view((rows,) + a.shape[1:])
        return out


def _layout(name: str, specs: list[tuple[str, str, tuple[int, ...]]]) -> LayerLayout:
    # decayed (matrix) parameters first, each group in the given order
    ordered = [s for s in specs if len(s[2]) >= 2] + [s for s in specs if len(s[2]) < 2]
    params, offset = [], 0
    for key, hf_name, shape in ordered:
        p = Param(key, hf_name, shape, offset)
        params.append(p)
        offset += p.numel
    decay = sum(p.numel for p in params if p.decay)
    return LayerLayout(name, tuple(params), offset, decay)


def layer_layouts(cfg: ModelConfig) -> list[LayerLayout]:
    """[embed, layers.0 … layers.{L-1}, head] for this model."""
    H, V, I, D = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.head_dim
    layouts = [_layout("embed", [("embed", "model.embed_tokens.weight", (V, H))])]
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        specs = [
            ("q", pre + "self_attn.q_proj.weight", (cfg.q_size, H)),
            ("k", pre + "self_attn.k_proj.weight", (cfg.kv_size, H)),
            ("v", pre + "self_attn.v_proj.weight", (cfg.kv_size, H)),
            ("o", pre + "self_attn.o_proj.weight", (H, cfg.q_size)),
            ("gate", pre + "mlp.gate_proj.weight", (I, H)),
            ("up", pre + "mlp.up_proj.weight", (I, H)),
            ("down", pre + "mlp.down_proj.weight", (H, I)),
            ("input_norm", pre + "input_layernorm.weight", (H,)),
            ("post_norm", pre + "post_attention_layernorm.weight", (H,)),
        ]
        if cfg.attention_bias:
            specs += [("q_bias", pre + "self_attn.q_proj.bias", (cfg.q_size,)),
                      ("k_bias", pre + "self_attn.k_proj.bias", (cfg.kv_size,)),
                      ("v_bias", pre + "self_attn.v_proj.bias", (cfg.kv_size,))]
        if cfg.attention_out_bias:
            specs.append(("o_bias", pre + "self_attn.o_proj.bias", (H,)))
        if cfg.qk_norm:
            specs += [("q_norm", pre + "self_attn.q_norm.weight", (D,)),
                      ("k_norm", pre + "self_attn.k_norm.weight", (D,))]
        layouts.append(_layout(f"layers.{i}", specs))
    head = [("norm", "model.norm.weight", (H,))]
    if not cfg.tie_word_embeddings:
        head.append(("lm_head", "lm_head.weight", (V, H)))
    layouts.append(_layout("head", head))
    return layouts


PAGE_BYTES = 4096


def host_block_bytes(nbytes: int, pinned: bool) -> int:
    """Bytes one host allocation of ``nbytes`` really takes. PyTorch's caching host allocator rounds every pinned
    block up to a power of two (a 3.4 GB fp32 buffer takes 4 GiB); a pageable one takes whole pages."""
    if pinned:
        return 1 << max(0, nbytes - 1).bit_length()
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES


@dataclass(frozen=True)
class Allocation:
    """One host buffer of the store, as the accounting (nbytes, the dry run, checkpoints) sees it."""
    kind: str              # "master", "working", "exp_avg", "exp_avg_sq", "grad"
    layer: int             # index into layouts
    numel: int
    dtype: torch.dtype
    pinned: bool

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def reserved_bytes(self) -> int:
        """What the allocation takes from the machine (see host_block_bytes)."""
        return host_block_bytes(self.nbytes, self.pinned)


class HostStore:
    """Flat per-layer host buffers (pinned when CUDA is present) and the parameter views into them.

    ``device="meta"`` builds the same layout with no memory behind it (the dry run's store)."""

    def __init__(self, cfg: ModelConfig, compute_dtype: torch.dtype, pin: bool = False, device: str = "cpu"):
        self.cfg = cfg
        self.compute_dtype = compute_dtype
        self.pinned = pin
        self.device = torch.device(device)
        self.layouts = layer_layouts(cfg)
        self.allocations: list[Allocation] = []
        self.master, self.working, self.exp_avg, self.exp_avg_sq, self.grad = [], [], [], [], []
        for i, layout in enumerate(self.layouts):
            n = layout.numel
            master = self._alloc("master", i, n, torch.float32, pin)
            self.master.append(master)
            # fp32 mode streams the master weights themselves: no second copy
            self.working.append(master if compute_dtype == torch.float32
                                else self._alloc("working", i, n, compute_dtype, pin))
            self.exp_avg.append(self._alloc("exp_avg", i, n, torch.float32, pin, zero=True))
            self.exp_avg_sq.append(self._alloc("exp_avg_sq", i, n, torch.float32, pin, zero=True))
            self.grad.append(self._alloc("grad", i, n, compute_dtype, pin, zero=True))

    def _alloc(self, kind: str, layer: int, n: int, dtype: torch.dtype, pinned: bool,
               zero: bool = False) -> torch.Tensor:
        """Every host buffer of the store is made here, so that what is counted is what is allocated. On meta
        (the dry run) nothing is pinned, but the allocation records what a real store would pin."""
        self.allocations.append(Allocation(kind, layer, n, dtype, pinned))
        make = torch.zeros if zero else torch.empty
        return make(n, dtype=dtype, device=self.device, pin_memory=pinned and self.device.type == "cpu")

    def state_buffers(self):
        """(kind, layer index, tensor) for every buffer a training checkpoint must hold: all of them but the
        gradient, which each step rewrites before it is read."""
        buffers = {"master": self.master, "working": self.working, "exp_avg": self.exp_avg,
                   "exp_avg_sq": self.exp_avg_sq}
        for a in self.allocations:
            if a.kind in buffers:
                yield a.kind, a.layer, buffers[a.kind][a.layer]

    @property
    def num_layers(self) -> int:
        return len(self.layouts)

    def num_parameters(self) -> int:
        return sum(layout.numel for layout in self.layouts)

    def nbytes(self, pinned: bool | None = None) -> int:
        """Bytes the store holds on the host (only the pinned, or only the pageable ones, if asked)."""
        return sum(a.nbytes for a in self.allocations if pinned is None or a.pinned == pinned)

    def named_master(self):
        """(hf_name, fp32 view) for every parameter, in layer order."""
        for layout, flat in zip(self.layouts, self.master):
            views = layout.views(flat)
            for p in layout.params:
                yield p.hf_name, views[p.key]

    def init_random(self, seed: int) -> None:
        """transformers' init: normal(0, 0.02) matrices, ones for norms, zeros for biases and the pad token's
        embedding row; one generator per layer so that building a model never needs more than its own buffers."""
        for index, (layout, flat) in enumerate(zip(self.layouts, self.master)):
            gen = torch.Generator().manual_seed(seed * 100003 + index)
            views = layout.views(flat)
            for p in layout.params:
                if p.decay:
                    views[p.key].normal_(0.0, INIT_STD, generator=gen)
                elif p.key.endswith("bias"):
                    views[p.key].zero_()
                else:
                    views[p.key].fill_(1.0)
        if self.cfg.pad_row is not None:   # as nn.Embedding(padding_idx) starts it
            self.layouts[0].views(self.master[0])["embed"][self.cfg.pad_row].zero_()
        self.refresh_working()

    def refresh_working(self) -> None:
        for master, working in zip(self.master, self.working):
            if working is not master:
                working.copy_(master)

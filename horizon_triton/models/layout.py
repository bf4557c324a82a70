"""A layer's parameters in one flat buffer, the unit the host store keeps and a staging slot holds: each ``Param``
at its offset, the decayed (matrix) ones first, and the views a layer template computes with. Every model family
describes its layers with these; imports nothing of the package."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Param:
    key: str               # short name inside the layer ("q", "gate", "input_norm", ...)
    hf_name: str           # full Hugging Face tensor name
    shape: tuple[int, ...]
    offset: int            # element offset inside the layer's flat buffer
    transposed: bool = False   # a LoRA B of MoE experts stored [E, in, out] (gpt-oss's): the delta is (B A)ᵀ

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


def layout_of(name: str, specs: list[tuple]) -> LayerLayout:
    """specs: (key, hf_name, shape) or (key, hf_name, shape, transposed) per parameter."""
    # decayed (matrix) parameters first, each group in the given order
    ordered = [s for s in specs if len(s[2]) >= 2] + [s for s in specs if len(s[2]) < 2]
    params, offset = [], 0
    for key, hf_name, shape, *transposed in ordered:
        p = Param(key, hf_name, shape, offset, *transposed)
        params.append(p)
        offset += p.numel
    decay = sum(p.numel for p in params if p.decay)
    return LayerLayout(name, tuple(params), offset, decay)

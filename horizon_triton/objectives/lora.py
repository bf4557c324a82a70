"""LoRA adapters on a frozen base (Hu et al. 2021), as peft's LoraConfig and lora.Linear define them.

Each chosen projection W[N, K] of every decoder layer gets A[r, K] and B[N, r]:

    y = x Wᵀ + s · (x Aᵀ) Bᵀ,    s = alpha / r    (alpha / √r with use_rslora)

A starts as nn.Linear's weights do (peft: kaiming_uniform_(a=√5), i.e. uniform in ±1/√K), B at zero, so the
starting model is the base. Only A and B train: the base (every decoder weight, the embedding, the norms, the
head) is frozen, held on the host as its working weights alone (store.py), and gets no gradient. The forward and
the hand-written backward are layer.py's projections on kernels/reference.py's lora_forward / lora_backward;
the generic template adds the same term to transformers' Linear modules and lets autograd take the adapters'.

Target names are peft's ``target_modules``: for the dense family q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj (peft's default for Llama is q_proj and v_proj); for a generic model (transformers' own layers)
any nn.Linear of a decoder layer, matched as peft matches them (models/generic/weights.adapter_layouts), and with
``target_parameters`` MoE experts' fused 3-D weights (peft's ParamWrapper: W_e + s · B_e A_e per expert, A[r·E, in],
B[out, r·E]; ``expert_delta``). The names are checked when the store is built. Saving writes
peft's format: adapter_config.json and adapter_model.safetensors (the fp32 masters, under peft's tensor names), which
``peft.PeftModel.from_pretrained(base, dir)`` loads; ``merged_values`` gives W + s·B A for a merged full model
that transformers loads alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..state import durable
from ..state.checkpoint import is_model_file, refuse_non_finite

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...]          # peft names
    use_rslora: bool = False
    target_parameters: tuple[str, ...] = ()     # peft's target_parameters (MoE experts' 3-D weights)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def spec_of(train_cfg) -> LoraSpec | None:
    """The adapters a TrainConfig asks for (None: a full fine-tune)."""
    if train_cfg is None or train_cfg.lora_rank is None:
        return None
    return LoraSpec(train_cfg.lora_rank, float(train_cfg.lora_alpha), tuple(train_cfg.lora_targets),
                    train_cfg.use_rslora, tuple(train_cfg.lora_target_parameters))


def init_adapters(store, seed: int) -> None:
    """peft's init: A uniform in ±1/√K (kaiming_uniform_ with a=√5 on [r, K]), B zero; one generator per layer."""
    for index, layout in enumerate(store.adapter_layouts):
        gen = torch.Generator().manual_seed(seed * 100003 + index + 7919)
        for p in layout.params:
            values = torch.zeros(p.shape)
            if p.key.endswith("lora_A"):
                bound = 1.0 / math.sqrt(p.shape[1])
                values.uniform_(-bound, bound, generator=gen)
            store.set_master(index, values, p.offset, adapters=True)


def adapter_config(spec: LoraSpec, cfg) -> dict:
    """adapter_config.json as peft's LoraConfig writes it (the fields that change what it loads); cfg: the
    model's ModelConfig or GenericConfig."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.source_path,
            "r": spec.rank, "lora_alpha": spec.alpha, "target_modules": sorted(spec.targets), "lora_dropout": 0.0,
            "use_rslora": spec.use_rslora, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
            "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
            **({"target_parameters": sorted(spec.target_parameters)} if spec.target_parameters else {}),
            "auto_mapping": {"base_model_class": cfg.architecture,
                             "parent_library": f"transformers.models.{cfg.model_type}.modeling_{cfg.model_type}"}}


def save_adapter(store, out_dir: str | Path, add_files=None) -> None:
    """adapter_config.json + adapter_model.safetensors (fp32 A and B) in out_dir, assembled beside it and swapped
    in whole as save_weights does (the old directory's other entries move into the new one)."""
    with durable.assembled(Path(out_dir), keep=lambda name: not is_model_file(name)) as tmp:
        tensors = {p.hf_name: store.master_values(index, p.offset, p.offset + p.numel, adapters=True)
                   .view(p.shape).clone() for index, layout in enumerate(store.adapter_layouts) for p in layout.params}
        for name, tensor in tensors.items():
            refuse_non_finite(name, tensor, out_dir)
        with durable.naming(tmp / ADAPTER_WEIGHTS):
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with durable.naming(tmp):
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(store.lora, store.cfg), indent=2))
            if add_files is not None:
                add_files(tmp)


def merged_values(store):
    """tensor_of(layer, param) for checkpoint.save_weights: the base's fp32 values, W + s·B A where a target has
    an adapter (peft's merge_and_unload)."""
    def tensor_of(layer: int, p) -> torch.Tensor:
        w = store.master_values(layer, p.offset, p.offset + p.numel).view(p.shape)
        layout = store.adapter_layouts[layer]
        by_key = {q.key: q for q in layout.params}
        module = p.key.removesuffix(".weight")       # a generic layout's "self_attn.q_proj.weight"; dense: "q"
        if f"{module}.lora_A" not in by_key:
            return w
        a, b = by_key[f"{module}.lora_A"], by_key[f"{module}.lora_B"]
        A = store.master_values(layer, a.offset, a.offset + a.numel, adapters=True).view(a.shape)
        B = store.master_values(layer, b.offset, b.offset + b.numel, adapters=True).view(b.shape)
        if w.dim() == 2:
            return w + store.lora.scale * (B @ A)
        return w + store.lora.scale * expert_delta(A, B, w.shape[0], b.transposed)
    return tensor_of


def expert_delta(A: torch.Tensor, B: torch.Tensor, num_experts: int, transposed: bool) -> torch.Tensor:
    """B_e A_e of every expert e ([E, out, in]; [E, in, out] for experts stored transposed, gpt-oss's) from peft's
    target_parameters layout: A[r·E, in] holds A_e as rows e·r:(e+1)·r, B[out, r·E] holds B_e as columns e, E + e,
    2E + e, ... (its r·E axis read as [r, E])."""
    A_e = A.view(num_experts, -1, A.shape[1])                                  # [E, r, in]
    B_e = B.view(B.shape[0], -1, num_experts).permute(2, 0, 1)                 # [E, out, r]
    delta = B_e @ A_e                                                          # [E, out, in]
    return delta.transpose(1, 2) if transposed else delta

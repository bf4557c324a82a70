"""Model and training configuration: frozen dataclasses, Hugging Face config.json reading, named presets."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# Hugging Face architecture name -> model_type, for the four families the layer template implements.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ARCHITECTURE_OF = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder. Built by hand (seeded random init) or read from a HF directory."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False          # biases on q/k/v
    qk_norm: bool = False                 # Qwen3's per-head RMSNorm on q and k
    max_position_embeddings: int = 4096
    attention_out_bias: bool | None = None  # bias on o_proj; None: same as attention_bias (Llama's convention)
    sliding_window: int | None = None     # Mistral: a query sees at most this many most recent keys
    rope_scaling: dict | None = None      # None, {"rope_type": "llama3", ...} or {"rope_type": "linear", ...}
    model_type: str | None = None         # llama | mistral | qwen2 | qwen3; None: qwen3 if qk_norm else llama
    pad_token_id: int | None = None       # its embedding row gets no gradient from the lookup (padding_idx)
    torch_dtype: str = "float32"          # dtype the weights were loaded from or built in
    source_path: str | None = field(default=None, compare=False)  # HF directory whose weights the engine loads

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; "
                                 "give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.attention_out_bias is None:
            object.__setattr__(self, "attention_out_bias", self.attention_bias)
        if self.model_type is None:
            object.__setattr__(self, "model_type", "qwen3" if self.qk_norm else "llama")
        if self.model_type not in ARCHITECTURE_OF:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: {sorted(ARCHITECTURE_OF)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "linear", "default"):
                raise ValueError(f"rope scaling {kind!r} is not supported yet (supported: llama3, linear)")
        if self.pad_token_id is not None and not -self.vocab_size <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary [0, {self.vocab_size}) "
                             "(transformers refuses such an embedding too); fix pad_token_id in config.json")

    # ---- sizes ------------------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def architecture(self) -> str:
        return ARCHITECTURE_OF[self.model_type]

    @property
    def pad_row(self) -> int | None:
        """Embedding row of the pad token (a negative pad_token_id counts from the end, as padding_idx does)."""
        return None if self.pad_token_id is None else self.pad_token_id % self.vocab_size

    @property
    def max_positions(self) -> int:
        """Positions a sequence may use: max_position_embeddings, or with rope scaling the stretched length
        factor × original_max_position_embeddings when the config gives a longer one that way."""
        s = self.rope_scaling
        if s is None or "factor" not in s:
            return self.max_position_embeddings
        original = s.get("original_max_position_embeddings", self.max_position_embeddings)
        return max(self.max_position_embeddings, int(s["factor"] * original))

    def num_parameters(self) -> int:
        from .models.dense.weights import layer_layouts   # torch, imported when needed
        return sum(layout.numel for layout in layer_layouts(self))

    # ---- Hugging Face -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Reads config.json (transformers 4 or 5 spelling) of a Llama / Mistral / Qwen2 / Qwen3 checkpoint (the
        hand-written template); any other architecture gives a GenericConfig (models/generic: transformers' own
        layer code)."""
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: expected a Hugging Face model directory")
        hf = json.loads(cfg_file.read_text())
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        model_type = SUPPORTED_ARCHITECTURES[arch] if arch else hf.get("model_type")
        if model_type not in ARCHITECTURE_OF:        # any other decoder: transformers' own layer code
            from .models.generic.config import GenericConfig
            return GenericConfig.from_pretrained(path)
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu / SwiGLU)")
        # transformers 5 groups rope settings in rope_parameters; transformers 4 has rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            raise ValueError(f"{cfg_file}: use_sliding_window=true (per-layer sliding windows of Qwen) is not "
                             "supported; set it to false")
        attention_bias = hf.get("attention_bias", False)
        out_bias = attention_bias
        if model_type == "qwen2":            # Qwen2 always has q/k/v biases and never an o_proj bias
            attention_bias, out_bias = True, False
        if model_type == "qwen3":            # Qwen3's attention_bias covers q/k/v/o alike
            out_bias = attention_bias
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"), rope_theta=float(rope_theta),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=attention_bias, attention_out_bias=out_bias, qk_norm=model_type == "qwen3",
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
            rope_scaling=scaling, model_type=model_type, torch_dtype=str(dtype).replace("torch.", ""),
            pad_token_id=hf.get("pad_token_id"), source_path=str(path),
        )

    def to_hf_config(self, dtype: str):
        """The transformers config object of this model's family (used to write config.json)."""
        import transformers
        common = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings, max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta, hidden_act="silu", architectures=[self.architecture],
            pad_token_id=self.pad_token_id,
        )
        if self.rope_scaling is not None:
            common["rope_scaling"] = dict(self.rope_scaling, rope_theta=self.rope_theta)
        extra = {
            "llama": dict(attention_bias=self.attention_bias),
            "mistral": dict(sliding_window=self.sliding_window),
            "qwen2": dict(use_sliding_window=False),
            "qwen3": dict(attention_bias=self.attention_bias, use_sliding_window=False),
        }[self.model_type]
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[self.model_type]
        config = cls(**common, **extra)
        # transformers 5 renamed torch_dtype to dtype (and warns on the old name)
        setattr(config, "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype", dtype)
        return config

    # ---- rotary embedding -------------------------------------------------------------------------------
    def inv_freq(self):
        """fp32[head_dim // 2] rotary inverse frequencies, with Llama 3 / linear scaling as transformers does."""
        import torch
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        s = self.rope_scaling
        if s is None:
            return inv
        kind = s.get("rope_type", s.get("type"))
        if kind == "linear":
            return inv / s["factor"]
        if kind == "llama3":
            factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old_len = s["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv


# Named presets. "tiny" trains on two CPU cores in seconds; "demo" is the built-in addition task's model.
PRESETS = {
    "tiny": dict(vocab_size=64, hidden_size=64, intermediate_size=176, num_layers=2, num_heads=2, num_kv_heads=1),
    "demo": dict(vocab_size=16, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2,
                 max_position_embeddings=64),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                     num_kv_heads=8, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                     num_kv_heads=8, rope_theta=500000.0),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule and execution settings. Optimizer semantics are torch.optim.AdamW's."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0     # None or 0: no clipping
    grad_accum_steps: int = 1
    warmup_steps: int = 0
    lr_schedule: str = "constant"         # "constant" | "cosine"
    device: str = "auto"                  # "cpu" | "cuda" | "auto" | "cpu-async" (the race-testing device)
    compute_dtype: str = "bfloat16"       # "bfloat16" | "float32" (exact mode)
    seed: int = 0
    num_slots: int = 2                    # device staging slots for streamed weights (2 or 3)
    checkpoint_budget_bytes: int | None = None  # activation checkpoints kept on the device; above it: offload
    #                                     (None: on CUDA what the free memory allows, on CPU every one)
    head_chunk_rows: int | None = None    # lm_head rows streamed per vocabulary chunk (None: what a slot holds)
    moe_merge_microbatches: int = 1       # generic MoE models: this many micro-batches pass a decoder layer
    #                                     together, its experts' grouped GEMMs run once over all their tokens (each
    #                                     expert's weights read once, not per micro-batch); the backward then holds
    #                                     this many micro-batches' recompute of the layer at once (1: one at a time)
    trace_path: str | None = None         # write a Chrome/Perfetto trace of every primitive here
    checkpoint_dir: str | None = None     # fit saves training checkpoints here (step-N directories), periodically
                                          # as below and when SIGINT/SIGTERM stops it
    save_every_steps: int | None = None   # a checkpoint every this many optimizer steps
    save_every_minutes: float | None = None  # a checkpoint when this much time passed since the last one
    keep_last: int | None = None          # keep only the newest this many checkpoints (None: all)
    optimizer_states: str = "fp32"        # Adam moments: "fp32" | "8bit" (blockwise 8-bit, bf16 compute only)
    optimizer_threads: int | None = None  # CPU AdamW threads; None: every core but one (at least one)
    preflight: bool = True                # refuse (MemoryError) before allocating what the machine cannot hold
    objective: str = "sft"                # "sft" (mean cross-entropy of the labels) | "dpo" (preference pairs,
    #                                     see preference.py; batches carry the reference's ref_logps)
    dpo_beta: float = 0.1                 # DPO's β (TRL's beta): how far the policy may move from the reference
    dpo_label_smoothing: float = 0.0      # ε: the probability a preference label is flipped (sigmoid, robust)
    dpo_loss: str = "sigmoid"             # "sigmoid" | "robust" | "hinge" | "ipo" (TRL's loss_type)
    lora_rank: int | None = None          # LoRA adapters of this rank on a frozen base (None: full fine-tune)
    lora_alpha: float = 8.0               # adapter scaling alpha / rank (alpha / sqrt(rank) with use_rslora)
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")   # peft's target_modules names (its Llama default)
    lora_target_parameters: tuple[str, ...] = ()   # peft's target_parameters: MoE experts' fused 3-D weights
    #                                     (e.g. mlp.experts.gate_up_proj, mlp.experts.down_proj), generic models only
    lora_dropout: float = 0.0             # only 0: the hand-written backward has no dropout mask
    use_rslora: bool = False              # rank-stabilized scaling (Kalajdzievski 2023), as peft's use_rslora
    share_host_store: bool = True         # data parallel: a node's ranks share one host store in /dev/shm, each
    #                                     updating its shard (False: a store per rank, e.g. a small /dev/shm)

    def __post_init__(self):
        self._check_optimizer()
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be 'bfloat16' or 'float32', got {self.compute_dtype!r}")
        if self.device not in ("cpu", "cuda", "auto", "cpu-async"):
            raise ValueError(f"device must be cpu, cuda, auto or cpu-async, got {self.device!r}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be ≥ 1, got {self.grad_accum_steps}")
        if isinstance(self.moe_merge_microbatches, bool) or not isinstance(self.moe_merge_microbatches, int) \
                or self.moe_merge_microbatches < 1:
            raise ValueError(f"moe_merge_microbatches must be an int ≥ 1 (1: each micro-batch through a layer on its "
                             f"own), got {self.moe_merge_microbatches!r}")
        if self.num_slots not in (2, 3):
            raise ValueError(f"num_slots must be 2 or 3, got {self.num_slots}")
        if self.head_chunk_rows is not None and self.head_chunk_rows < 1:
            raise ValueError(f"head_chunk_rows must be ≥ 1 (or None), got {self.head_chunk_rows}")
        for name in ("save_every_steps", "save_every_minutes", "keep_last"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive (or None), got {value}")
        if self.optimizer_states not in ("fp32", "8bit"):
            raise ValueError(f"optimizer_states must be 'fp32' or '8bit', got {self.optimizer_states!r}")
        if self.optimizer_states == "8bit" and self.compute_dtype != "bfloat16":
            raise ValueError("optimizer_states='8bit' needs compute_dtype='bfloat16' (its master is kept as bf16 + "
                             "int16 halves); use optimizer_states='fp32' with compute_dtype='float32'")
        if self.objective not in ("sft", "dpo"):
            raise ValueError(f"objective must be 'sft' or 'dpo', got {self.objective!r}")
        if self.dpo_loss not in ("sigmoid", "robust", "hinge", "ipo"):
            raise ValueError(f"dpo_loss must be 'sigmoid', 'robust', 'hinge' or 'ipo', got {self.dpo_loss!r}")
        if not self.dpo_beta > 0:
            raise ValueError(f"dpo_beta must be > 0, got {self.dpo_beta}")
        if not 0.0 <= self.dpo_label_smoothing < 0.5:
            raise ValueError(f"dpo_label_smoothing must be in [0, 0.5), got {self.dpo_label_smoothing}")
        self._check_lora()
        if self.optimizer_threads is not None and (not isinstance(self.optimizer_threads, int)
                                                   or isinstance(self.optimizer_threads, bool)
                                                   or self.optimizer_threads < 1):
            raise ValueError(f"optimizer_threads must be an int ≥ 1 or None (every core but one), got "
                             f"{self.optimizer_threads!r}")

    def _check_optimizer(self) -> None:
        """What torch.optim.AdamW refuses (and eps = 0, which divides by zero where a moment is 0), plus a
        negative warm-up or clipping norm: refused before anything is built."""
        def number(name, value, ok, rule):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                raise ValueError(f"{name} must be {rule}, got {value!r}")
        number("lr", self.lr, lambda v: v >= 0, "a finite number ≥ 0")
        number("weight_decay", self.weight_decay, lambda v: v >= 0, "a finite number ≥ 0")
        number("eps", self.eps, lambda v: v > 0, "a finite number > 0")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(self.betas))        # a list from JSON or YAML
        for i, beta in enumerate(self.betas):
            number(f"betas[{i}]", beta, lambda v: 0 <= v < 1, "in [0, 1)")
        if self.max_grad_norm is not None:
            number("max_grad_norm", self.max_grad_norm, lambda v: v >= 0, "a finite number ≥ 0 (0 or None: no "
                   "clipping)")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int ≥ 0, got {self.warmup_steps!r}")

    def _check_lora(self) -> None:
        for field in ("lora_targets", "lora_target_parameters"):
            names = getattr(self, field)
            if isinstance(names, str):
                names = [t for t in names.split(",") if t]
            object.__setattr__(self, field, tuple(names))     # a list from JSON or the CLI
        if self.lora_rank is None:
            if self.lora_target_parameters:
                raise ValueError("lora_target_parameters needs lora_rank (the adapters' rank)")
            return
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 1:
            raise ValueError(f"lora_rank must be an int ≥ 1 (or None: full fine-tune), got {self.lora_rank!r}")
        # the names themselves are checked against the model's modules when its store is built (adapter_layouts)
        for field, kind, peft_name, example in (
                ("lora_targets", "module", "target_modules", "q_proj, v_proj"),
                ("lora_target_parameters", "parameter", "target_parameters", "mlp.experts.gate_up_proj")):
            names = getattr(self, field)
            if len(set(names)) != len(names) or not all(isinstance(t, str) and t for t in names):
                raise ValueError(f"{field} {list(names)}: give distinct {kind} names, as peft's {peft_name} "
                                 f"(e.g. {example})")
        if not self.lora_targets and not self.lora_target_parameters:
            raise ValueError("lora_targets and lora_target_parameters are both empty: name the modules (peft's "
                             "target_modules, e.g. q_proj, v_proj) or experts' parameters to adapt")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if self.lora_dropout != 0:
            raise ValueError(f"lora_dropout={self.lora_dropout} is not supported: the adapters' hand-written "
                             "backward has no dropout mask; use lora_dropout=0 (peft's lora_dropout=0.0)")
        if self.optimizer_states != "fp32":
            raise ValueError("optimizer_states='8bit' does not apply to LoRA: the adapters keep fp32 moments (they "
                             "are a small fraction of the host store); use optimizer_states='fp32'")

    def lr_at(self, step: int, total_steps: int | None) -> float:
        """Learning rate of 1-based optimizer step `step`, as transformers' get_{constant,cosine}_schedule_with_warmup
        gives it (linear warm-up from 0 over warmup_steps, then constant or a half cosine to 0 at total_steps)."""
        current = step - 1  # the schedulers count steps already taken
        if current < self.warmup_steps:
            return self.lr * current / max(1, self.warmup_steps)
        if self.lr_schedule == "constant":
            return self.lr
        if total_steps is None:
            raise ValueError("lr_schedule='cosine' needs the number of steps: pass max_steps to fit() or a loader "
                             "with a length")
        progress = (current - self.warmup_steps) / max(1, total_steps - self.warmup_steps)
        return self.lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

"""The configuration of a model trained through transformers' own layer code: the text model's transformers config,
and what the engine reads of any model (sizes, tied head, pad row, positions). Imports nothing of the package."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# model types whose text model is a nested config (multimodal wrappers): their text part is what is trained
TEXT_PART = ("text_config",)


def text_config(hf):
    """The decoder's config: a multimodal config's text part, else the config itself."""
    for name in TEXT_PART:
        sub = getattr(hf, name, None)
        if sub is not None and hasattr(sub, "num_hidden_layers"):
            return sub
    return hf


@dataclass(frozen=True)
class GenericConfig:
    """A decoder of any family transformers implements, trained through its decoder-layer class (template.py).

    ``hf_json``: the text model's transformers config as JSON (compared between data-parallel ranks);
    ``source_path``: the Hugging Face directory whose weights the engine loads (None: a seeded random init)."""
    hf_json: str
    source_path: str | None = field(default=None, compare=False)

    generic = True

    def __post_init__(self):
        object.__setattr__(self, "_fields", json.loads(self.hf_json))     # parsed once: read on every step

    @classmethod
    def from_hf(cls, hf_config, source_path: str | None = None) -> "GenericConfig":
        return cls(text_config(hf_config).to_json_string(use_diff=False), source_path)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "GenericConfig":
        """Reads config.json of a Hugging Face model directory (any architecture transformers knows)."""
        import transformers
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path / 'config.json'} not found: expected a Hugging Face model directory")
        try:
            hf = transformers.AutoConfig.from_pretrained(str(path))
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path / 'config.json'}: transformers {transformers.__version__} does not know this "
                             f"model ({e}); a newer transformers may") from e
        cfg = cls.from_hf(hf, str(path))
        from .skeleton import skeleton
        skeleton(cfg)            # refuses now, naming what it cannot train, rather than when the engine is built
        return cfg

    # ---- the transformers config --------------------------------------------------------------------------
    @property
    def hf(self):
        """A fresh transformers config object (callers may change it: this one stays as read)."""
        import transformers
        d = json.loads(self.hf_json)
        return transformers.AutoConfig.for_model(d.pop("model_type"), **d)

    def _get(self, key, default=None):
        return self._fields.get(key, default)

    # ---- what every part of the engine reads ---------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self._get("model_type")

    @property
    def vocab_size(self) -> int:
        return self._get("vocab_size")

    @property
    def hidden_size(self) -> int:
        return self._get("hidden_size")

    @property
    def num_layers(self) -> int:
        return self._get("num_hidden_layers")

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self._get("tie_word_embeddings", False))

    @property
    def pad_token_id(self) -> int | None:
        return self._get("pad_token_id")

    @property
    def pad_row(self) -> int | None:
        pad = self.pad_token_id
        return None if pad is None or not -self.vocab_size <= pad < self.vocab_size else pad % self.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self._get("max_position_embeddings", 1 << 20)

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def torch_dtype(self) -> str:
        return str(self._get("dtype") or self._get("torch_dtype") or "float32").replace("torch.", "")

    @property
    def architecture(self) -> str:
        archs = self._get("architectures") or []
        return archs[0] if archs else self.hf.__class__.__name__.replace("Config", "ForCausalLM")

    @property
    def head_dim(self) -> int:
        return self._get("head_dim") or self.hidden_size // self._get("num_attention_heads")

    @property
    def sliding_window(self) -> int | None:
        return self._get("sliding_window")

    def num_parameters(self) -> int:
        from .weights import layer_layouts
        return sum(layout.numel for layout in layer_layouts(self))

    def to_hf_config(self, dtype: str):
        """The transformers config written with saved weights (config.json)."""
        config = self.hf
        config.dtype = dtype
        return config

"""Stored autotuning choices: the per-kernel autotune scripts write them, the launch functions read them.

One JSON file (``$HORIZON_TUNING_CACHE`` or ``~/.cache/horizon_triton/autotune.json``) maps
device name → kernel name → shape key → config dict. A launch function asks ``best_config(kernel, key,
default)`` and gets the stored winner for this GPU, or its own default where nothing was tuned.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

_cache: dict | None = None
_device_named: str | None = None      # device_named(): the device whose choices are read and written


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cache_path() -> Path:
    return Path(os.environ.get("HORIZON_TUNING_CACHE", Path.home() / ".cache" / "horizon_triton" / "autotune.json"))


def _device_name() -> str:
    if _device_named is not None:
        return _device_named
    if interpreting() or not torch.cuda.is_available():
        return "interpreter"
    return torch.cuda.get_device_name()


def _load() -> dict:
    global _cache
    if _cache is None:
        path = cache_path()
        try:
            _cache = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError):
            _cache = {}  # a damaged cache only costs the tuned speed, never correctness
    return _cache


def best_config(kernel: str, shape_key: str, default: dict) -> dict:
    """The stored best config of ``kernel`` for ``shape_key`` on this device, else ``default``."""
    if interpreting() and _device_named is None:
        return default
    return _load().get(_device_name(), {}).get(kernel, {}).get(shape_key, default)


def stored_choices() -> dict:
    """{kernel: {shape key: config}}: every choice stored for this device (empty where nothing was tuned)."""
    return _load().get(_device_name(), {})


@contextlib.contextmanager
def device_named(name: str):
    """Inside: the choices stored under ``name`` are read (the interpreter's launches included) and written in
    place of this machine's device's; for tests that take a GPU's stored choice on CPU."""
    global _device_named
    previous, _device_named = _device_named, name
    try:
        yield
    finally:
        _device_named = previous


def store_config(kernel: str, shape_key: str, config: dict) -> None:
    """Record ``config`` as the winner; written atomically so a concurrent reader never sees half a file."""
    data = _load()
    data.setdefault(_device_name(), {}).setdefault(kernel, {})[shape_key] = config
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def time_ms(fn, warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds of ``fn()`` on the current GPU (CUDA events via triton.testing)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")

"""Which host-store layouts let a model train on a given host and card: the full fine-tune with the exact fp32
master and fp32 moments (14 B/param), the same with 8-bit moments (8 B/param), and LoRA on a frozen bf16 base
(~2 B/param), each judged by plan()'s host bytes (the store as allocated plus the step's host buffers), not a
per-parameter guess; for the most exact layout that fits, the device peak at one row and the tokens per step at
which the bus hides. Imports plan."""
from __future__ import annotations

from ..config import TrainConfig
from .plan import hardware_figures, plan, tokens_to_hide_transfers

LORA_RANK = 16
LORA_TARGETS = ("o_proj",)       # the attention output projection: every known model's attention has one


def host_layouts(lora_rank: int = LORA_RANK, lora_targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, TrainConfig]:
    """The layouts tried, most exact first: name -> TrainConfig."""
    return {"14 B/param": TrainConfig(),
            "8 B/param (8-bit moments)": TrainConfig(optimizer_states="8bit"),
            f"LoRA r{lora_rank} (frozen base)": TrainConfig(lora_rank=lora_rank, lora_targets=tuple(lora_targets))}


def fitting_layouts(model_cfg, *, host_memory_bytes: int, hardware: str | dict = "h100", seq_len: int = 4096,
                    lora_rank: int = LORA_RANK, lora_targets: tuple[str, ...] = LORA_TARGETS,
                    find_hiding: bool = True) -> dict:
    """For each layout of host_layouts: plan()'s host bytes at one row of seq_len tokens and whether they fit
    host_memory_bytes (and the device peak fits the card). The best layout is the first, most exact one that
    fits both; for it, its plan at one row and (find_hiding) the fewest tokens per step whose copies hide under
    the compute and the AdamW (plan.tokens_to_hide_transfers; None where not even at 2^16 rows, or not searched:
    the search dry-runs the model at several sizes). best is None if none fits."""
    hw = hardware_figures(hardware)
    layouts, best = [], None
    for name, train_cfg in host_layouts(lora_rank, lora_targets).items():
        result = plan(model_cfg, train_cfg, tokens_per_step=seq_len, seq_len=seq_len, hardware=hw,
                      host_memory_bytes=host_memory_bytes, find_hiding=False)
        layouts.append({"name": name, "train_cfg": train_cfg, "host_bytes": result["host_bytes"],
                        "host_bytes_per_parameter": result["host_bytes"] / result["num_parameters"],
                        "fits_host": result["fits_host"], "fits_device": result["fits_device"],
                        "device_peak_bytes": result["device_peak_bytes"]})
        if best is None and result["fits_host"] and result["fits_device"]:
            best = (name, train_cfg, result)
    out = {"model": model_cfg, "hardware": hw["name"], "host_memory_bytes": host_memory_bytes, "seq_len": seq_len,
           "num_parameters": result["num_parameters"], "layouts": layouts, "best": None}
    if best is not None:
        name, train_cfg, result = best
        out["best"] = {"name": name, "train_cfg": train_cfg, "plan": result,
                       "device_peak_bytes": result["device_peak_bytes"],
                       "tokens_to_hide_transfers": tokens_to_hide_transfers(model_cfg, train_cfg, hw, seq_len)
                       if find_hiding else None}
    return out

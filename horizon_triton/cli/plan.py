"""``horizon-triton plan``: memory, bus bytes and step time of a run from a model's config alone, and the deepest
model of its shape that fits the host memory and the card."""
from __future__ import annotations

from pathlib import Path

from .train import lora_options, train_config


def run_plan(args) -> dict:
    """Prints the plan of --model on --gpu, and the deepest model of its shape that fits --host-ram and the card."""
    from ..config import PRESETS, ModelConfig, preset
    from ..devices.device import host_memory_info
    from ..models.family import is_generic
    from ..planning.plan import format_plan, largest_model, parse_bytes, plan
    path = Path(args.model)
    if path.is_file():
        if path.name != "config.json":
            raise ValueError(f"--model {args.model}: give a model directory or its config.json")
        path = path.parent
    model_cfg = preset(args.model) if args.model in PRESETS and not path.exists() else ModelConfig.from_pretrained(path)
    train_cfg = train_config(compute_dtype=args.dtype, grad_accum_steps=args.grad_accum, **lora_options(args))
    host_ram = parse_bytes(args.host_ram) if args.host_ram else host_memory_info()[1]
    options = dict(tokens_per_step=args.tokens_per_step, hardware=args.gpu, seq_len=args.seq_len)
    result = plan(model_cfg, train_cfg, host_memory_bytes=host_ram, moe_skew=args.moe_skew, **options)
    if is_generic(model_cfg):         # the deepest-model search is for the hand-written families' uniform layers
        print(format_plan(result, None))
        return {"plan": result, "largest": None}
    largest = largest_model(model_cfg, train_cfg, host_memory_bytes=host_ram, **options)
    print(format_plan(result, largest))
    if largest is None:
        print(f"  not even one layer of this shape fits {args.gpu} with {host_ram / 1e12:.2f} TB of host memory")
    return {"plan": result, "largest": largest}

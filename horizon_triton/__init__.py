"""horizon-triton: fine-tune language models larger than GPU memory on one GPU.

    import horizon_triton as ht
    engine = ht.Engine(ht.ModelConfig.from_pretrained("hf_dir"), ht.TrainConfig(lr=1e-5))
    history = engine.fit(loader)
    engine.save_pretrained("out_dir")
    ht.plan(model_cfg, tokens_per_step=32768, hardware="h100")   # memory and speed from the config alone
"""
from .config import ModelConfig, TrainConfig, preset
from .engine import Engine
from .planning.plan import plan

__all__ = ["Engine", "ModelConfig", "TrainConfig", "plan", "preset"]

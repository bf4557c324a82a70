"""Training objectives beyond the mean loss: DPO's losses and reference pass (preference) and LoRA adapters
(lora). Imports config, models, state, data, devices.distributed and the kernels."""

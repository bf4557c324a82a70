"""Training objectives beyond the mean loss: DPO (preference) and LoRA adapters (lora). Imports config, state,
host, data and the kernels."""

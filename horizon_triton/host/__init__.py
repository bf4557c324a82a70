"""Host memory: the parameter store (store), its node-wide share (node_store), page-locking (pinning) and the CPU
AdamW driver (optimizer). Imports config, models, state.durable and the kernels."""

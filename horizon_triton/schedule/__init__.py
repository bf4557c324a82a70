"""The step's schedule: the streaming primitives and run_step (scheduler), activation checkpoints (activations),
the embedding's rows (embedding_rows), the trace (trace). Imports config, models, host and the kernels."""

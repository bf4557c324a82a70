"""The step's schedule: the streaming primitives, the gradient sinks and run_step (scheduler), what they keep on
the device (pipeline) and how it is built (build), activation checkpoints (activations), the embedding's rows
(embedding_rows), the trace (trace). Imports config, models, host, state, objectives.lora and the kernels."""

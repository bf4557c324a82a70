"""The hand-written dense decoder (Llama, Mistral, Qwen2, Qwen3): the stateless layer template and its backward
(layer). Imports config, models.ops and the kernels only."""

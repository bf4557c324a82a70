"""The hand-written dense decoder (Llama, Mistral, Qwen2, Qwen3): the stateless layer template and its backward
(layer), its weights' Hugging Face names, shapes and LoRA targets (weights). Imports config and models.layout."""

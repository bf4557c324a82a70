"""Tiny random models of families the generic layer template trains, built with transformers and saved as a hub
checkpoint would be (transformers' own save_pretrained: MoE experts one tensor per expert), and batches with
packed documents and padding."""
from __future__ import annotations

import torch
import transformers

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=96, head_dim=8, pad_token_id=None, eos_token_id=None, bos_token_id=None,
              max_position_embeddings=128)

# model_type -> what its tiny config sets beyond COMMON
FAMILIES = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "gemma2": dict(sliding_window=6),
    # Gated DeltaNet then full attention, each with a sparse MoE block (and its shared expert)
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                       linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16),
    "gemma3_text": dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
    # the per-layer input embeddings and cross-layer KV sharing switched off (the engine has no model-level parts)
    "gemma4_text": dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                        hidden_size_per_layer_input=0, num_kv_shared_layers=0, global_head_dim=16),
    "phi3": dict(),
    "olmo2": dict(),
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                    logits_scaling=4.0),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"]),
    # MLA attention; layer 0 dense, layers 1-2 routed experts (groups of 2, top-1 group) + a shared expert
    "deepseek_v3": dict(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                        n_group=2, topk_group=1, moe_intermediate_size=16, n_shared_experts=1, kv_lora_rank=16,
                        q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, head_dim=4,
                        num_key_value_heads=4, routed_scaling_factor=2.5),
    "glm4_moe": dict(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=16, n_shared_experts=1, n_group=1, topk_group=1, use_qk_norm=True,
                     partial_rotary_factor=0.5),
    # chunked attention (chunks of 4), then a full-attention layer without rope; MoE on layers 2 and 3 only
    "llama4_text": dict(num_hidden_layers=3, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=40,
                        attention_chunk_size=4, layer_types=["chunked_attention", "full_attention", "chunked_attention"],
                        no_rope_layers=[1, 0, 1], interleave_moe_layer_step=2, moe_layers=[1],
                        attn_temperature_tuning=True, floor_scale=4, attn_scale=0.1),
    # gated delta-net (linear attention) and gated full attention
    "qwen3_5_text": dict(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                         linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                         linear_num_value_heads=4),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                             linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                             linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, shared_expert_intermediate_size=16),
}


def make_generic_model(model_type: str, path, seed: int = 0, **overrides):
    """Builds the tiny random model, perturbs its 1-D parameters (norms, biases: their gradients and loading are
    then really checked) and its checkpoint's buffers (Gemma 4's layer scalars: then really loaded and kept),
    saves it to path; returns the model (fp32)."""
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES.get(model_type, {}), **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, p in model.state_dict(keep_vars=True).items():
            if p.is_floating_point() and (p.dim() == 1 or name not in params):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def mixed_batches(n: int, vocab: int = 96, seed: int = 1) -> list[dict]:
    """n batches [2, 12] of random tokens, the first 3 labels of a row ignored; batch 1 (when n > 1) packs two
    documents a row, batch 2 (when n > 2) pads its second row's last 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, vocab, (2, 12), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        batch = {"input_ids": ids, "labels": labels}
        if i == 1:
            batch["position_ids"] = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]] * 2)
        if i == 2:
            batch["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
            batch["attention_mask"][1, 9:] = 0
            labels[1, 9:] = -100
        out.append(batch)
    return out

"""Full-size configurations of models the generic layer template trains, as transformers configs (the text
model's config.json fields), for the dry run, plan() and their tests: ``known_model(name)`` gives the
GenericConfig. Values are those of each model's published config.json; where a value was written from memory
rather than read from the file, the entry's comment says so (the parameter counts the tests check are the
models' published totals, which such a value would miss). Imports models.generic.config only."""
from __future__ import annotations

import json

from ..models.generic.config import GenericConfig

# What the Qwen3.5 MoE text models share (qwen3_5_moe_text): GQA 32/2 heads of 256, gated-delta-net layers with
# 16 key / 64 value heads of 128, experts and a shared expert of 1024; each model below sets its own width, depth
# and experts
QWEN3_5_MOE_TEXT = dict(
    model_type="qwen3_5_moe_text", vocab_size=248320, num_attention_heads=32, num_key_value_heads=2, head_dim=256,
    linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
    linear_num_value_heads=64, moe_intermediate_size=1024, shared_expert_intermediate_size=1024,
    full_attention_interval=4, max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_parameters=dict(rope_type="default", rope_theta=10000000.0, partial_rotary_factor=0.25),
    eos_token_id=248044)

KNOWN_MODELS = {
    # openai/gpt-oss-120b: 36 layers alternating sliding (128) and full attention with sinks, 128 experts (top 4)
    # with clamped SwiGLU and biases; 116.8B parameters
    "gpt-oss-120b": dict(
        model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128, num_experts_per_tok=4,
        experts_per_token=4, sliding_window=128, swiglu_limit=7.0, attention_bias=True, rms_norm_eps=1e-5,
        layer_types=["sliding_attention", "full_attention"] * 18, max_position_embeddings=131072,
        initial_context_length=4096, rope_theta=150000.0,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                          original_max_position_embeddings=4096, truncate=False),
        tie_word_embeddings=False, pad_token_id=199999, eos_token_id=200002, router_aux_loss_coef=0.9,
        output_router_logits=False),
    # Qwen/Qwen3-235B-A22B: 94 layers, 128 experts (top 8) of 1536, GQA 64/4 heads of 128, qk-norm; 235.1B
    "qwen3-235b-a22b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        moe_intermediate_size=1536, num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, attention_bias=False,
        router_aux_loss_coef=0.001, output_router_logits=False),
    # Qwen/Qwen3.5-122B-A10B, the text part (qwen3_5_moe_text): 48 layers, 3 gated-delta-net (linear attention)
    # layers to 1 full-attention layer, 256 experts (top 8) of 1024 and a shared expert of 1024. WRITTEN FROM
    # MEMORY, not read from the config.json: hidden_size, the head counts and the expert sizes may differ; the
    # total it gives (checked in tests) is near the published 122B
    "qwen3.5-122b-a10b": dict(QWEN3_5_MOE_TEXT, hidden_size=3072, num_hidden_layers=48, num_experts=256,
                              num_experts_per_tok=8),
    # Qwen/Qwen3.5-397B-A17B, the text part (qwen3_5_moe_text): 60 layers, 3 gated-delta-net (linear attention)
    # layers to 1 full-attention layer, 512 experts (top 10) of 1024 and a shared expert of 1024, GQA 32/2 heads
    # of 256. WRITTEN FROM MEMORY, not read from the config.json (the sizes agree with the architecture table of a
    # third-party conversion's model card): fields other than those sizes may differ; the total it gives (checked
    # in tests) is within 1% of the published 397B
    "qwen3.5-397b-a17b": dict(QWEN3_5_MOE_TEXT, hidden_size=4096, num_hidden_layers=60, num_experts=512,
                              num_experts_per_tok=10),
    # deepseek-ai/DeepSeek-V3: 61 layers (the first 3 dense, 18432 wide), multi-head latent attention (128 heads,
    # q rank 1536, kv rank 512, rope dim 64), 256 routed experts (top 8 in 4 of 8 groups, sigmoid scores scaled by
    # 2.5) of 2048 and one shared expert. 671B without its multi-token-prediction layer (num_nextn_predict_layers:
    # transformers does not build it). Written from memory of the published config.json; every size agrees with
    # transformers' DeepseekV3Config defaults (taken from that file) and the total with the published 671B; rope
    # scaling (yarn, factor 40) changes no size
    "deepseek-v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=163840, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1),
    # google/gemma-3-27b-it, the text part (gemma3_text): 62 layers, 5 sliding (1024) to 1 global, GQA 32/16 heads
    # of 128, query_pre_attn_scalar 168, embeddings scaled by √H, tied head; 27.0B in the text model (the
    # vision tower's 0.4B is not trained here)
    "gemma-3-27b": dict(
        model_type="gemma3_text", vocab_size=262208, hidden_size=5376, intermediate_size=21504,
        num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=16, head_dim=128,
        query_pre_attn_scalar=168, sliding_window=1024, sliding_window_pattern=6, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=dict(rope_type="linear", factor=8.0),
        max_position_embeddings=131072, final_logit_softcapping=None, attn_logit_softcapping=None,
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0, bos_token_id=2,
        eos_token_id=1),
}


def known_model(name: str) -> GenericConfig:
    """The GenericConfig of a model of KNOWN_MODELS (its transformers config at full size, no weights)."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    import transformers
    fields = dict(KNOWN_MODELS[name])
    hf = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    return GenericConfig.from_hf(hf)

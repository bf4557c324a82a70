"""The independent judge for engine tests: tiny transformers models saved as safetensors, and a reference
training loop with transformers + torch.optim.AdamW + clip_grad_norm_."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers

FAMILIES = {
    # name: (config class, model class, extra config)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama_tied_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                        dict(tie_word_embeddings=True, attention_bias=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=24)),
}


def make_hf_model(family: str, path, seed: int = 0, dtype=torch.float32, **overrides):
    """Builds a tiny random model of the family (GQA: 4 query heads, 2 kv heads), saves it to path."""
    config_cls, model_cls, extra = FAMILIES[family]
    kwargs = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False)
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"
    model = model_cls(config).to(dtype)
    with torch.no_grad():  # non-trivial norms and biases, so their gradients and loading are really checked
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def load_hf(path, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")


def random_batches(n: int, vocab: int, batch: int = 2, seq: int = 12, seed: int = 1, mask_prefix: int = 3):
    """n batches of random tokens; the first mask_prefix labels of each row are ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = ids.clone()
        labels[:, :mask_prefix] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def document_logits(model, batch) -> torch.Tensor:
    """The model's logits [B, S, V] with each document of a packed row (its positions restarting) run as a sequence
    of its own: what packing with documents kept apart computes, whatever the model's own packing support (some of
    transformers' models mask packed documents from position_ids, others, and linear-attention layers, do not)."""
    if "position_ids" not in batch:             # one document a row
        kwargs = {"attention_mask": batch["attention_mask"]} if "attention_mask" in batch else {}
        return model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        pos = batch["position_ids"][b]
        starts = [0] + [t for t in range(1, len(pos)) if pos[t] != pos[t - 1] + 1] + [len(pos)]
        pieces = []
        for s, e in zip(starts, starts[1:]):
            kwargs = {"attention_mask": batch["attention_mask"][b:b + 1, s:e]} if "attention_mask" in batch else {}
            pieces.append(model(input_ids=batch["input_ids"][b:b + 1, s:e], position_ids=pos[None, s:e],
                                use_cache=False, **kwargs).logits)
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows)


def reference_train(model, batches, *, lr, weight_decay, betas, eps, max_grad_norm, grad_accum_steps=1,
                    schedule=None, split_documents=False):
    """transformers forward + our mean-over-step-tokens loss + torch AdamW. Returns per-step dicts.
    split_documents: packed batches' documents run one at a time (document_logits)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)
    sched = schedule(opt) if schedule is not None else None
    history = []
    for start in range(0, len(batches), grad_accum_steps):
        group = batches[start:start + grad_accum_steps]
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
        opt.zero_grad()
        total = 0.0
        for b in group:
            kwargs = {k: b[k] for k in ("position_ids", "attention_mask") if k in b}
            # use_cache=False: with a cache, transformers ignores the documents that packed position_ids mark
            if split_documents and "position_ids" in b:
                logits = document_logits(model, b).float()
            else:
                logits = model(input_ids=b["input_ids"], use_cache=False, **kwargs).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                   ignore_index=-100, reduction="sum") / tokens
            loss.backward()
            total += loss.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        if sched is not None:
            sched.step()
        history.append({"loss": total, "grad_norm": float(norm), "lr": lr_now, "tokens": tokens})
    return history

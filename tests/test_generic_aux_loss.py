"""The MoE router's auxiliary load-balancing loss on the generic path (models/generic/router_balance.py) against
transformers: its ``outputs.loss`` (token-mean cross-entropy + coef·aux over every layer's routing, padding
excluded) backpropagated with torch AdamW."""
import pytest
import torch
import transformers
import torch.nn.functional as F
from safetensors.torch import load_file

import horizon_triton as ht
from generic_models import make_generic_model, mixed_batches

OPT = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)
AUX = dict(output_router_logits=True, router_aux_loss_coef=0.1)
MOE = {"qwen3_moe": {}, "mixtral": dict(num_local_experts=4, num_experts_per_tok=2)}


def _train(path, batches, grad_accum_steps=1):
    engine = ht.Engine(ht.ModelConfig.from_pretrained(path),
                       ht.TrainConfig(**OPT, compute_dtype="float32", device="cpu", grad_accum_steps=grad_accum_steps))
    return engine, engine.fit(batches)


def reference_train_aux(model, batches, grad_accum_steps):
    """transformers + torch AdamW (hf_reference.reference_train's decay grouping and clipping). A step of one
    micro-batch backpropagates transformers' own outputs.loss; with M micro-batches each backpropagates its
    cross-entropy summed over the step's counted tokens plus coef·outputs.aux_loss / M (the engine's objective)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPT["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=OPT["lr"], betas=OPT["betas"], eps=OPT["eps"])
    coef = model.config.router_aux_loss_coef
    history = []
    for start in range(0, len(batches), grad_accum_steps):
        group = batches[start:start + grad_accum_steps]
        M = len(group)
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
        opt.zero_grad()
        total, aux_total = 0.0, 0.0
        for b in group:
            kwargs = {k: b[k] for k in ("position_ids", "attention_mask") if k in b}
            out = model(input_ids=b["input_ids"], labels=b["labels"], use_cache=False, **kwargs)
            if M == 1:
                loss = out.loss
            else:
                logits = out.logits.float()
                loss = (F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1),
                                        ignore_index=-100, reduction="sum") / tokens + coef * out.aux_loss / M)
            loss.backward()
            total += loss.item()
            aux_total += out.aux_loss.item() / M
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), OPT["max_grad_norm"])
        opt.step()
        history.append({"loss": total, "aux_loss": aux_total, "grad_norm": float(norm)})
    return history


def _assert_weights_match(path, model, atol):
    saved = load_file(str(path / "model.safetensors"))
    checked = 0
    for name, value in model.state_dict().items():
        if name in saved:
            torch.testing.assert_close(saved[name], value, atol=atol, rtol=0, msg=name)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("model_type", sorted(MOE))
@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_aux_loss_matches_transformers(tmp_path, model_type, grad_accum_steps):
    make_generic_model(model_type, tmp_path / "src", **MOE[model_type], **AUX)
    batches = mixed_batches(3 * grad_accum_steps)            # plain, packed, padded (and again with accumulation)
    engine, history = _train(tmp_path / "src", batches, grad_accum_steps)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32)
    want = reference_train_aux(reference, batches, grad_accum_steps)
    assert len(history) == len(want) == 3
    for got, ref in zip(history, want):
        assert got["aux_loss"] == pytest.approx(ref["aux_loss"], rel=1e-5)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    engine.save_pretrained(tmp_path / "out")
    _assert_weights_match(tmp_path / "out", reference, atol=1e-4)


def test_aux_gradient_moves_the_routers(tmp_path):
    """The same run without the aux loss (output_router_logits=False) ends with routers that differ by far more
    than the parity tolerance: the parity above could not pass with the aux gradient missing."""
    make_generic_model("qwen3_moe", tmp_path / "aux", **AUX)
    make_generic_model("qwen3_moe", tmp_path / "plain")
    batches = mixed_batches(3)
    with_aux, history = _train(tmp_path / "aux", batches)
    without, plain = _train(tmp_path / "plain", batches)
    assert "aux_loss" not in plain[0]
    assert history[0]["loss"] == pytest.approx(plain[0]["loss"] + AUX["router_aux_loss_coef"] * history[0]["aux_loss"],
                                               rel=1e-6)
    with_aux.save_pretrained(tmp_path / "aux_out")
    without.save_pretrained(tmp_path / "plain_out")
    a, b = load_file(str(tmp_path / "aux_out" / "model.safetensors")), load_file(
        str(tmp_path / "plain_out" / "model.safetensors"))
    gates = [n for n in a if n.endswith("mlp.gate.weight")]
    assert len(gates) == 2
    for name in gates:
        assert (a[name] - b[name]).abs().max() > 1e-3, name


def test_aux_loss_refused_without_router_logits(tmp_path):
    make_generic_model("gemma2", tmp_path / "src", **AUX)
    with pytest.raises(ValueError, match="declares no router logits"):
        ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"),
                  ht.TrainConfig(**OPT, compute_dtype="float32", device="cpu"))

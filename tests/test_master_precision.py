"""The bf16 engine's exact master and its 8-bit moments, end to end against transformers + torch.optim.AdamW."""
import pytest
import torch
from safetensors.torch import load_file

import horizon_triton as ht
from hf_reference import load_hf, make_hf_model, random_batches, reference_train

NO_CLIP = 1e9     # the reference clips with clip_grad_norm_; a norm it never reaches


def test_updates_below_half_a_bf16_ulp_are_kept(tmp_path):
    """Weights of magnitude ~0.5 (std), lr 1e-4: most updates are below half a bf16 ulp (2^-9 at 0.5). The
    engine's loss falls as transformers' with an fp32 master does; with a plain bf16 master (transformers in
    bf16 + torch AdamW) it barely moves, so this test fails for an engine that keeps a bf16 master."""
    model = make_hf_model("llama", tmp_path / "init")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(25)
    model.save_pretrained(tmp_path / "src")
    batches = random_batches(1, vocab=96) * 25
    opt = dict(lr=1e-4, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
    engine = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"),
                       ht.TrainConfig(**opt, max_grad_norm=None, device="cpu"))
    ours = [h["loss"] for h in engine.fit(batches)]
    fp32 = [h["loss"] for h in reference_train(load_hf(tmp_path / "src"), batches, **opt, max_grad_norm=NO_CLIP)]
    bf16 = [h["loss"] for h in reference_train(load_hf(tmp_path / "src", dtype=torch.bfloat16), batches, **opt,
                                               max_grad_norm=NO_CLIP)]
    fell = {name: run[0] - run[-1] for name, run in (("ours", ours), ("fp32", fp32), ("bf16", bf16))}
    assert fell["fp32"] > 0.2 * fp32[0]                 # the setting does learn
    assert fell["bf16"] < 0.3 * fell["fp32"]            # ... but not with a bf16 master
    assert fell["ours"] > 0.9 * fell["fp32"], fell
    assert ours[-1] == pytest.approx(fp32[-1], rel=0.03)


def test_loading_fills_the_halves_exactly_and_float32_saves_the_master(tmp_path):
    make_hf_model("qwen3", tmp_path / "src")
    source = load_file(str(tmp_path / "src" / "model.safetensors"))
    engine = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"), ht.TrainConfig(device="cpu"))
    for name, values in engine.store.named_master():
        assert torch.equal(values, source[name]), name      # fp32 weights, bf16 compute: nothing lost
    engine.fit(random_batches(2, vocab=96))
    engine.save_pretrained(tmp_path / "out", dtype="float32")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    store = engine.store
    for name, layer, p in store.named_params():
        joined = store.master_values(layer, p.offset, p.offset + p.numel).view(p.shape)
        assert torch.equal(saved[name], joined), name
        hi = store.working[layer][p.offset:p.offset + p.numel].view(p.shape)
        assert (hi.float() - joined).abs().max() <= joined.abs().max() * 2 ** -8   # the working weights round it
    reloaded = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "out"), ht.TrainConfig(device="cpu"))
    for layer in range(store.num_layers):
        assert torch.equal(reloaded.store.master_low[layer], store.master_low[layer])
        assert torch.equal(reloaded.store.working[layer].view(torch.int16), store.working[layer].view(torch.int16))


def _markov_batches(n: int, vocab: int = 96, batch: int = 4, seq: int = 16, seed: int = 5):
    """Token sequences from a fixed Markov chain (each token has 3 successors, probabilities 0.6/0.3/0.1):
    a language with a loss floor (about 0.9 nats) that a small model approaches within a hundred steps."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.stack([torch.randperm(vocab, generator=g)[:3] for _ in range(vocab)])
    probs = torch.tensor([0.6, 0.3, 0.1])
    out = []
    for _ in range(n):
        ids = torch.empty(batch, seq, dtype=torch.int64)
        ids[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, seq):
            choice = torch.multinomial(probs, batch, replacement=True, generator=g)
            ids[:, t] = successors[ids[:, t - 1], choice]
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


@pytest.mark.slow
def test_8bit_moments_finetune_ends_within_1_5_percent_of_fp32_moments(tmp_path):
    """120 optimizer steps of a small llama on a Markov-chain language (fresh batches each step): the mean
    loss of the last 10 steps with 8-bit moments within 1.5% of the one with fp32 moments (same engine, same
    batches otherwise)."""
    make_hf_model("llama", tmp_path / "src")
    batches = _markov_batches(120)
    opt = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, max_grad_norm=1.0, device="cpu")
    final = {}
    for states in ("fp32", "8bit"):
        engine = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"),
                           ht.TrainConfig(**opt, optimizer_states=states))
        losses = [h["loss"] for h in engine.fit(batches)]
        assert losses[-1] < 0.5 * losses[0]
        final[states] = sum(losses[-10:]) / 10
    assert final["8bit"] == pytest.approx(final["fp32"], rel=0.015), final

"""LoRA on a frozen streamed base against peft + torch.optim.AdamW: losses, gradient norms and adapter weights in
fp32; peft and transformers load what we save and give the same logits; checkpoints resume bit-exactly; the host
store holds ~2 bytes per base parameter."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import horizon_triton as ht
from hf_reference import load_hf, make_hf_model, random_batches, reference_train
from host_memory_probe import probe, slope
from horizon_triton.kernels import reference

peft = pytest.importorskip("peft")

OPT = dict(lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peft_name(p) -> str:
    """Our adapter's name (peft's saved name) as a parameter of a live PeftModel (adapter "default")."""
    return p.hf_name.replace(".weight", ".default.weight")


def _adapters(engine) -> dict[str, torch.Tensor]:
    """{peft parameter name: fp32 master} of every adapter of the engine."""
    s = engine.store
    return {_peft_name(p): s.master_values(i, p.offset, p.offset + p.numel, adapters=True).view(p.shape).clone()
            for i, layout in enumerate(s.adapter_layouts) for p in layout.params}


def _peft_model(src, rank, alpha, targets, start=None, rslora=False):
    model = peft.get_peft_model(load_hf(src), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                                                              lora_dropout=0.0, use_rslora=rslora))
    if start is not None:              # the same starting A as ours (B is zero in both)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in start.items():
                params[name].copy_(value)
    return model


def _train_both(tmp_path, family, rank, alpha, targets, steps=4, grad_accum_steps=1, rslora=False, run=None, **opt):
    """Our engine and peft + torch AdamW from the same starting adapters; run: more TrainConfig settings."""
    src = tmp_path / "src"
    make_hf_model(family, src)
    opt = {**OPT, **opt}
    batches = random_batches(steps * grad_accum_steps, vocab=96)
    engine = ht.Engine(ht.ModelConfig.from_pretrained(src),
                       ht.TrainConfig(**{**dict(device="cpu"), **opt, **(run or {})}, grad_accum_steps=grad_accum_steps,
                                      compute_dtype="float32", lora_rank=rank, lora_alpha=alpha, lora_targets=targets,
                                      use_rslora=rslora))
    model = _peft_model(src, rank, alpha, targets, _adapters(engine), rslora)
    history = engine.fit(batches)
    ref = reference_train(model, batches, grad_accum_steps=grad_accum_steps, **opt)
    return engine, history, model, ref


def _assert_parity(engine, history, model, ref):
    assert len(history) == len(ref)
    for got, want in zip(history, ref):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-4)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4, abs=1e-6)
    params = dict(model.named_parameters())
    ours = _adapters(engine)
    assert set(ours) == {n for n, p in params.items() if p.requires_grad}
    for name, value in ours.items():
        torch.testing.assert_close(value, params[name].detach(), atol=1e-4, rtol=0, msg=name)
    moved = [n for n in ours if "lora_B" in n]
    assert all(ours[n].abs().max() > 0 for n in moved)       # every B trained away from its zero start


@pytest.mark.parametrize("family, rank, alpha, targets", [
    ("llama", 4, 8, ("q_proj", "v_proj")),                          # peft's default targets, untied
    ("llama_tied_bias", 8, 16, ALL),                                # tied embeddings, q/k/v/o biases
    ("qwen3", 2, 4, ("k_proj", "o_proj", "down_proj")),             # q/k norms, head_dim 24
    ("mistral", 16, 8, ("gate_proj", "up_proj")),                   # sliding window, rank above hidden/4
])
def test_fp32_matches_peft(tmp_path, family, rank, alpha, targets):
    _assert_parity(*_train_both(tmp_path, family, rank, alpha, targets))


def test_grad_accumulation_clipping_and_rslora_match_peft(tmp_path):
    # max_grad_norm below the norms seen: every step is clipped
    engine, history, model, ref = _train_both(tmp_path, "qwen2", 4, 8, ("q_proj", "v_proj", "up_proj"), steps=3,
                                              grad_accum_steps=2, rslora=True, max_grad_norm=0.05)
    assert all(h["grad_norm"] > 0.05 for h in history[1:])
    _assert_parity(engine, history, model, ref)


def test_async_streams_chunked_head_and_offloaded_checkpoints_match_peft(tmp_path):
    # the race-testing device, three slots, the head in 5 vocabulary chunks (two passes), every checkpoint offloaded
    run = dict(device="cpu-async", num_slots=3, head_chunk_rows=20, checkpoint_budget_bytes=0)
    _assert_parity(*_train_both(tmp_path, "llama_tied_bias", 4, 8, ALL, steps=3, run=run))


def test_triton_kernels_match_the_torch_path(monkeypatch):
    """The engine through the Triton kernels (interpreter): the frozen head in 3 vocabulary chunks without dW,
    the norm and matmul split for the adapters. (The fused head's d_weight=None: tests/test_cross_entropy.py.)"""
    runs = {}
    for backend in ("interpret", None):
        if backend is None:
            monkeypatch.delenv("HORIZON_KERNELS", raising=False)
        else:
            monkeypatch.setenv("HORIZON_KERNELS", backend)
        cfg = ht.preset("tiny", qk_norm=True, attention_bias=True, tie_word_embeddings=True)
        engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", compute_dtype="float32", lr=1e-2, lora_rank=4,
                                               lora_targets=ALL, head_chunk_rows=24))
        history = engine.fit(random_batches(2, vocab=64, seq=16))
        runs[backend] = [h["loss"] for h in history], _adapters(engine), engine.kernel_backend
    assert (runs["interpret"][2], runs[None][2]) == ("triton-interpret", "torch")
    assert runs["interpret"][0] == pytest.approx(runs[None][0], rel=1e-5)
    for name, value in runs[None][1].items():   # 1% of the lr: Adam's step is sensitive where |grad| ~ eps
        torch.testing.assert_close(runs["interpret"][1][name], value, atol=1e-4, rtol=0, msg=name)


def test_lora_reference_backward_matches_autograd():
    torch.manual_seed(0)
    T, K, N, r, s = 7, 12, 10, 3, 1.7
    x, a, b, dy = (torch.randn(T, K, dtype=torch.float64), torch.randn(r, K, dtype=torch.float64),
                   torch.randn(N, r, dtype=torch.float64), torch.randn(T, N, dtype=torch.float64))
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    (((leaves[0] @ leaves[1].t()) @ leaves[2].t()) * s * dy).sum().backward()
    delta, xa = reference.lora_forward(x, a, b, s)
    torch.testing.assert_close(delta, (x @ a.t()) @ b.t() * s)
    d_a, d_b = torch.zeros_like(a), torch.zeros_like(b)
    for kept in (xa, None):                                         # saved, or recomputed from x
        d_a.zero_(), d_b.zero_()
        dx = reference.lora_backward(dy, x, kept, a, b, s, d_a, d_b)
        for got, leaf in zip((dx, d_a, d_b), leaves):
            torch.testing.assert_close(got, leaf.grad)


def test_init_as_peft_and_starts_at_the_base(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama", src, hidden_size=256, intermediate_size=320)
    engine = ht.Engine(ht.ModelConfig.from_pretrained(src),
                       ht.TrainConfig(compute_dtype="float32", device="cpu", lora_rank=64, lora_targets=ALL))
    ours = _adapters(engine)
    theirs = {n: p.detach() for n, p in _peft_model(src, 64, 8, ALL).named_parameters() if p.requires_grad}
    for name, value in ours.items():
        if "lora_B" in name:
            assert value.abs().max() == 0
            continue
        bound = 1 / math.sqrt(value.shape[1])                       # kaiming_uniform_(a=√5): U(±1/√fan_in)
        assert value.abs().max() <= bound and theirs[name].abs().max() <= bound
        assert float(value.std()) == pytest.approx(float(theirs[name].std()), rel=0.05)   # thousands of draws
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(engine.logits(ids), load_hf(src)(ids).logits, atol=1e-4, rtol=0)


def test_saved_adapter_loads_in_peft_and_merged_in_transformers(tmp_path):
    engine, history, model, _ = _train_both(tmp_path, "llama_tied_bias", 4, 8, ALL, steps=3)
    engine.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())
    loaded = peft.PeftModel.from_pretrained(load_hf(tmp_path / "src"), tmp_path / "adapter")
    ids = torch.randint(0, 96, (2, 11))
    ours = engine.logits(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours, atol=1e-4, rtol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, ours, atol=1e-4, rtol=0)
    engine.save_pretrained(tmp_path / "merged", merge=True)
    merged = load_hf(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, atol=1e-4, rtol=0)
        reference_merge = loaded.merge_and_unload().state_dict()
        for name, tensor in load_file(str(tmp_path / "merged" / "model.safetensors")).items():
            torch.testing.assert_close(tensor, reference_merge[name], atol=1e-6, rtol=0, msg=name)


def test_checkpoint_resumes_a_lora_run_bit_exactly(tmp_path):
    src = tmp_path / "src"
    make_hf_model("qwen3", src)
    cfg = ht.TrainConfig(**OPT, device="cpu", lora_rank=4, lora_targets=("q_proj", "down_proj"), warmup_steps=1)
    batches = random_batches(6, vocab=96)
    whole = ht.Engine(ht.ModelConfig.from_pretrained(src), cfg)
    full_history = whole.fit(batches)
    first = ht.Engine(ht.ModelConfig.from_pretrained(src), cfg)
    first.fit(batches[:3])
    ckpt = first.save_checkpoint(tmp_path / "ckpt")
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {t["kind"] for t in manifest["tensors"].values()} == {"lora_working", "lora_master_low", "lora_exp_avg",
                                                                "lora_exp_avg_sq"}   # no base, no gradient
    resumed = ht.Engine.from_checkpoint(tmp_path / "ckpt")
    rest = resumed.fit(batches[3:])
    assert [h["loss"] for h in rest] == [h["loss"] for h in full_history[3:]]
    assert [h["grad_norm"] for h in rest] == [h["grad_norm"] for h in full_history[3:]]
    for name, value in _adapters(whole).items():
        assert torch.equal(value, _adapters(resumed)[name]), name
    other = ht.Engine(ht.ModelConfig.from_pretrained(src), ht.TrainConfig(device="cpu", lora_rank=8))
    with pytest.raises(ValueError, match="LoRA adapters: checkpoint"):
        other.load_checkpoint(ckpt)


def test_bf16_default_learns_and_stays_close_to_fp32(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama", src)
    batches = random_batches(1, vocab=96) * 8                       # one batch again and again: its loss falls
    runs = {}
    for dtype in ("bfloat16", "float32"):
        engine = ht.Engine(ht.ModelConfig.from_pretrained(src),
                           ht.TrainConfig(lr=1e-2, device="cpu", compute_dtype=dtype, lora_rank=8, lora_alpha=16,
                                          lora_targets=ALL))
        runs[dtype] = [h["loss"] for h in engine.fit(batches)]
    assert runs["bfloat16"][-1] < runs["bfloat16"][0] - 0.3
    assert runs["bfloat16"] == pytest.approx(runs["float32"], rel=0.02)


def test_store_layout_and_errors():
    cfg = ht.ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_layers=3, num_heads=4,
                         num_kv_heads=2)
    engine = ht.Engine(cfg, ht.TrainConfig(device="cpu", lora_rank=4))
    kinds = {}
    for a in engine.store.allocations:
        kinds[a.kind] = kinds.get(a.kind, 0) + a.nbytes
    adapter_params = 3 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)       # q: A[4, 64] B[64, 4]; v: A[4, 64] B[32, 4]
    assert kinds == {"working": 2 * cfg.num_parameters(), "lora_working": 2 * adapter_params,
                     "lora_master_low": 2 * adapter_params, "lora_exp_avg": 4 * adapter_params,
                     "lora_exp_avg_sq": 4 * adapter_params, "lora_grad": 4 * adapter_params}
    for bad, match in [(dict(lora_rank=4, lora_dropout=0.1), "lora_dropout=0.1 is not supported"),
                       (dict(lora_rank=4, lora_targets=["q_proj", "q_proj"]), "give distinct module names"),
                       (dict(lora_rank=0), "lora_rank must be an int"),
                       (dict(lora_rank=4, optimizer_states="8bit"), "does not apply to LoRA")]:
        with pytest.raises(ValueError, match=match):
            ht.TrainConfig(**bad)
    assert ht.TrainConfig(lora_rank=2, lora_targets="q_proj,o_proj").lora_targets == ("q_proj", "o_proj")
    with pytest.raises(ValueError, match=r"\['qkv'\] unknown; this model's projections are \['q_proj'"):
        ht.Engine(cfg, ht.TrainConfig(device="cpu", lora_rank=4, lora_targets=["q_proj", "qkv"]))   # at store build
    with pytest.raises(ValueError, match="merge=True merges LoRA adapters"):
        ht.Engine(cfg, ht.TrainConfig(device="cpu")).save_pretrained("unused", merge=True)


@pytest.mark.slow
def test_peak_host_memory_per_base_parameter():
    """2 B per base parameter (its bf16 weights) and the adapters' state: the store's slope, measured as
    tests/test_host_memory.py measures the full fine-tune's."""
    shallow, deep = (probe(depth, "--lora-rank", "16") for depth in (2, 12))   # about 88M and 201M base parameters
    assert deep["store_bytes"] <= 2.1 * deep["params"]
    assert deep["host_peak_bytes"] == deep["store_bytes"]
    store_slope = slope(shallow, deep, "store_bytes")
    assert 2.0 < store_slope < 2.1
    assert store_slope - 0.25 <= slope(shallow, deep, "rss_growth") <= store_slope + 0.05, (shallow, deep)


LLAMA_70B = ht.ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                           num_kv_heads=8, rope_theta=500000.0, max_position_embeddings=8192)


def test_plan_at_70b_holds_two_bytes_per_base_parameter():
    from horizon_triton.planning.plan import format_plan, plan
    lora = plan(LLAMA_70B, ht.TrainConfig(lora_rank=16), tokens_per_step=8192, find_hiding=False)
    full = plan(LLAMA_70B, ht.TrainConfig(), tokens_per_step=8192, find_hiding=False)
    P, info = lora["num_parameters"], lora["lora"]
    adapters = 80 * (16 * 8192 + 8192 * 16 + 16 * 8192 + 1024 * 16)      # q: A[16, 8192] B[8192, 16]; v: B[1024, 16]
    assert info["adapter_parameters"] == adapters
    store = sum(lora["host_store_bytes"].values())
    assert store == pytest.approx(2 * P + 16 * adapters, rel=1e-5)       # bf16 base + 16 B per adapter parameter
    assert 2.0 < info["host_bytes_per_base_parameter"] == lora["host_bytes"] / P <= 2.0 + 16 * adapters / P + 0.02
    assert lora["d2h_bytes_per_step"] == 4 * adapters                     # only the adapters' fp32 gradients
    assert lora["device_fixed_bytes"] < full["device_fixed_bytes"] / 2     # accumulators of the adapters' size
    assert lora["flops_per_step"] < 0.8 * full["flops_per_step"]          # no weight-gradient GEMMs of the base
    assert "rank 16 (q_proj, v_proj)" in format_plan(lora)


def test_cli_train_lora_saves_peft_adapter_and_merged_model(tmp_path, capsys):
    from horizon_triton import cli
    from tiny_tokenizers import make_tokenizer
    src = tmp_path / "src"
    make_hf_model("llama", src, max_position_embeddings=256)
    make_tokenizer(src, style="chatml")
    records = [{"messages": [{"role": "user", "content": "what color is the sky ?"},
                             {"role": "assistant", "content": "blue ."}]}] * 4
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["train", "--model", str(src), "--data", str(data), "--device", "cpu", "--dtype", "float32", "--steps",
              "3", "--batch-size", "2", "--seq-len", "32", "--lr", "1e-2", "--lora-rank", "4", "--lora-alpha", "16",
              "--lora-targets", "q_proj,o_proj,down_proj"]
    assert cli.main([*common, "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 16, ["down_proj", "o_proj", "q_proj"])
    assert (tmp_path / "adapter" / "tokenizer_config.json").is_file()
    assert cli.main([*common, "--out", str(tmp_path / "merged"), "--merge"]) == 0
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(load_hf(src), tmp_path / "adapter")(input_ids=ids).logits
        merged = load_hf(tmp_path / "merged")(ids).logits
        base = load_hf(src)(ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=0)      # same seed, data and steps: same run
    assert (adapted - base).abs().max() > 1e-3                          # and it trained something
    assert cli.main(["train", "--model", str(src), "--data", str(data), "--out", str(tmp_path / "x"), "--merge"]) == 2
    assert "need --lora-rank" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "tiny", "--lora-rank", "8", "--tokens-per-step", "256",
                     "--host-ram", "20MB"]) == 0
    assert "rank 8 (q_proj, v_proj)" in capsys.readouterr().out

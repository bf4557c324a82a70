"""What the engine offers the hand-written families, on models trained through the generic layer template
(models/generic; tiny qwen3_moe and gemma2 from generic_models.py): bf16 compute with fp32 and 8-bit moments,
training checkpoints and their bit-exact resume, DPO with reference log-probs, data parallel, the CLI, and the
inference calls (logits, evaluate) — each against transformers, a formula, or the uninterrupted run.

gemma2 soft-caps its logits (final_logit_softcapping): the head's forward-only passes (logits, evaluate,
reference_logps) must go through the template's head to match transformers."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import transformers

import horizon_triton as ht
from horizon_triton import cli
from horizon_triton.kernels.reference import IGNORE_INDEX
from horizon_triton.models.generic.config import GenericConfig
from horizon_triton.state import training_state
from generic_models import make_generic_model, mixed_batches
from hf_reference import document_logits
from test_distributed import assert_matches, run_ranks
from test_dpo import METRICS, random_pairs, torch_dpo_train
from tiny_tokenizers import make_tokenizer

MODEL_TYPES = ["gemma2", "qwen3_moe"]     # a soft-capped dense model and an MoE (every family: test_generic_template)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """model_type -> the directory of its tiny random model (and a tokenizer, for the CLI)."""
    root = tmp_path_factory.mktemp("generic")
    out = {}
    for model_type in MODEL_TYPES:
        make_generic_model(model_type, root / model_type)
        make_tokenizer(root / model_type)
        out[model_type] = root / model_type
    return out


def _reference(src):
    return transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)


# ---- bf16 compute, fp32 and 8-bit moments ------------------------------------------------------------------------
@pytest.mark.parametrize("states, bytes_per_param", [("fp32", (14.0, 14.0)), ("8bit", (8.0, 8.2))])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_bf16_trains_with_fp32_and_8bit_moments(sources, model_type, states, bytes_per_param):
    cfg = ht.ModelConfig.from_pretrained(sources[model_type])
    engine = ht.Engine(cfg, ht.TrainConfig(lr=1e-2, device="cpu", compute_dtype="bfloat16",
                                           optimizer_states=states))
    per_param = engine.store.nbytes() / cfg.num_parameters()
    assert bytes_per_param[0] <= per_param <= bytes_per_param[1]
    batches = mixed_batches(3)
    history = engine.fit(batches * 3)
    losses = [h["loss"] for h in history]
    # the first step's loss (before any update) is transformers' fp32 loss within bf16 rounding
    want = _loss(_reference(sources[model_type]), batches[:1])
    assert losses[0] == pytest.approx(want, rel=2e-2)
    assert all(torch.isfinite(torch.tensor([h["grad_norm"] for h in history])))
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3      # the same three batches, learnt


def _loss(model, batches):
    """transformers' mean cross-entropy over the counted label tokens of batches."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = document_logits(model, b).float()
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum"))
            tokens += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / tokens


# ---- training checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type, dtype, states", [("qwen3_moe", "bfloat16", "8bit"),
                                                       ("gemma2", "float32", "fp32")])
def test_checkpointed_run_resumed_equals_an_uninterrupted_run(sources, tmp_path, model_type, dtype, states):
    cfg = ht.ModelConfig.from_pretrained(sources[model_type])
    train = ht.TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=3, lr_schedule="cosine", grad_accum_steps=2,
                           max_grad_norm=0.05, device="cpu", compute_dtype=dtype, optimizer_states=states)
    batches = mixed_batches(3) * 2          # 3 steps of 2 micro-batches
    straight = ht.Engine(cfg, train)
    history = straight.fit(batches)
    first = ht.Engine(cfg, dataclasses.replace(train, checkpoint_dir=str(tmp_path / "ckpt"), save_every_steps=2))
    head = first.fit(batches[:4], max_steps=3)          # the loader runs out after step 2, of a 3-step schedule
    first.close()
    resumed = ht.Engine.from_checkpoint(tmp_path / "ckpt")
    assert isinstance(resumed.model_cfg, GenericConfig) and resumed.step == 2 and resumed.micro_batches == 4
    rest = resumed.fit(batches[resumed.micro_batches:])
    for key in ("loss", "grad_norm", "lr"):
        assert [h[key] for h in head + rest] == [h[key] for h in history], key
    theirs = {f"{resumed.store.layouts[i].name}.{kind}": t for kind, i, t in resumed.store.state_buffers()}
    for kind, i, t in straight.store.state_buffers():
        assert torch.equal(theirs[f"{straight.store.layouts[i].name}.{kind}"], t)


def test_checkpoint_of_another_model_is_refused(sources, tmp_path):
    engine = ht.Engine(ht.ModelConfig.from_pretrained(sources["gemma2"]),
                       ht.TrainConfig(device="cpu", compute_dtype="float32"))
    engine.fit(mixed_batches(1))
    engine.save_checkpoint(tmp_path / "ckpt")
    other = ht.Engine(GenericConfig.from_pretrained(sources["qwen3_moe"]),
                      ht.TrainConfig(device="cpu", compute_dtype="float32"))
    with pytest.raises(training_state.CheckpointError, match="model_type: checkpoint 'gemma2', this model "
                                                             "'qwen3_moe'"):
        other.load_checkpoint(tmp_path / "ckpt")


# ---- inference: logits, evaluate, save_pretrained ---------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES + ["qwen3_5_text"])      # + linear attention, run per document
def test_logits_and_evaluate_match_transformers(tmp_path, model_type):
    """gemma2: soft-capped at 0.5 (the tiny model's logits are ~0.1: its default cap of 30 would change them by
    less than the tolerance), through the template's head, not the plain matmul."""
    make_generic_model(model_type, tmp_path / "src", **({"final_logit_softcapping": 0.5} if model_type == "gemma2"
                                                         else {}))
    engine = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"),
                       ht.TrainConfig(device="cpu", compute_dtype="float32", lr=1e-2))
    engine.fit(mixed_batches(2))
    engine.save_pretrained(tmp_path / "out")
    trained = _reference(tmp_path / "out")
    batches = mixed_batches(3, seed=7)
    packed = batches[1]
    with torch.no_grad():
        want = document_logits(trained, packed)
    got = engine.logits(packed["input_ids"], position_ids=packed["position_ids"])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert engine.evaluate(batches) == pytest.approx(_loss(trained, batches), rel=1e-5)


# ---- DPO ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_dpo_matches_torch_autograd(sources, model_type):
    opt = dict(lr=2e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)
    engine = ht.Engine(ht.ModelConfig.from_pretrained(sources[model_type]),
                       ht.TrainConfig(**opt, compute_dtype="float32", device="cpu", objective="dpo", dpo_beta=0.5))
    batches = random_pairs(3, 2, seq=12, seed=4)
    model = _reference(sources[model_type])
    with_reference = []
    for b, ref in zip(batches, engine.reference_logps(batches)):
        with torch.no_grad():       # each labelled token's log-prob, aligned with its label
            logits = model(input_ids=b["input_ids"], use_cache=False).logits.float()
        labels = b["labels"][:, 1:]
        want = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        torch.testing.assert_close(ref[:, 1:], torch.where(labels != IGNORE_INDEX, want, 0.0), atol=1e-5, rtol=0)
        assert not ref[:, 0].any()
        with_reference.append(dict(b, ref_logps=ref))
    history = engine.fit(with_reference)
    want = torch_dpo_train(model, batches, beta=0.5, eps=0.0, loss_type="sigmoid", lr=opt["lr"], weight_decay=0.0,
                           betas=opt["betas"], eps_adam=opt["eps"], max_grad_norm=opt["max_grad_norm"])
    assert len(history) == len(want) == 3
    for got, ref in zip(history, want):
        for key in METRICS + ("grad_norm",):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
    assert history[0]["rewards/margins"] == 0 and history[1]["rewards/margins"] != 0


# ---- data parallel -----------------------------------------------------------------------------------------------
def test_two_ranks_match_one_process(sources, tmp_path):
    """qwen3_moe (experts and router through transformers' code), 2 gloo ranks × 2 micro-batches against one
    process accumulating 4 (test_distributed.py's harness and tolerances)."""
    spec = {"model_dir": str(sources["qwen3_moe"]), "batches": {"n": 8, "seed": 3},
            "train": {"compute_dtype": "float32", "grad_accum_steps": 2}}
    ranks = run_ranks(tmp_path, spec)
    assert_matches(spec, ranks, 2, loss_tol=1e-5, weight_tol=1e-5, norm_tol=1e-5)


# ---- the command line --------------------------------------------------------------------------------------------
def test_cli_train_end_to_end(sources, tmp_path, capsys):
    records = [{"text": "the cat sat on the mat ."}, {"prompt": "did the dog run ?", "response": "yes ."}] * 4
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    rc = cli.main(["train", "--model", str(sources["qwen3_moe"]), "--data", str(data), "--out", str(out),
                   "--device", "cpu", "--dtype", "float32", "--steps", "3", "--batch-size", "2", "--seq-len", "16",
                   "--lr", "1e-2"])
    assert rc == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and all(line["loss"] > 0 for line in lines)
    tuned, original = _reference(out), _reference(sources["qwen3_moe"])
    assert tuned.config.model_type == "qwen3_moe"
    changed = {n for n, p in original.state_dict().items() if not torch.equal(p, tuned.state_dict()[n])}
    assert {"model.embed_tokens.weight", "model.layers.0.mlp.gate.weight"} <= changed     # the router trained
    assert any("experts" in n for n in changed)

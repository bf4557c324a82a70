"""DPO (horizon_triton/objectives/preference.py) against independent references: torch.autograd on the loss formulas, a small
transformers + torch.autograd + torch AdamW implementation of DPO training, TRL's DPOTrainer itself (skipped
where trl is absent) for the numbers and for the tokenization of preference records, and the synthetic addition
preference set for learning."""
import copy
from dataclasses import replace
import random

import pytest
import torch
import torch.nn.functional as F

import horizon_triton as ht
from hf_reference import load_hf, make_hf_model
from horizon_triton import data
from horizon_triton.objectives import preference
from horizon_triton.kernels.reference import IGNORE_INDEX
from test_engine_hf import _assert_weights_match
from tiny_tokenizers import make_tokenizer

OPT = dict(lr=2e-3, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)
METRICS = ("loss",) + preference.METRICS


# ---- the formulas ------------------------------------------------------------------------------------------
def _formula(policy, reference, lengths, beta, eps, loss_type):
    """The per-pair losses as TRL writes them (chosen rows first there, interleaved here)."""
    c, r = policy[0::2] - reference[0::2], policy[1::2] - reference[1::2]
    z = beta * (c - r)
    if loss_type == "sigmoid":
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    return (c / lengths[0::2] - r / lengths[1::2] - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("hinge", 0.0),
                                            ("ipo", 0.0)])
def test_closed_form_gradients_match_autograd(loss_type, eps):
    g = torch.Generator().manual_seed(0)
    policy = (torch.randn(12, generator=g, dtype=torch.float64) * 5 - 20).requires_grad_()
    reference = torch.randn(12, generator=g, dtype=torch.float64) * 5 - 20
    lengths = torch.randint(1, 9, (12,), generator=g).double()
    want = _formula(policy, reference, lengths, 0.3, eps, loss_type)
    want.sum().backward()
    loss, grad = preference.dpo_loss(policy.detach(), reference, lengths, 0.3, eps, loss_type)
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grad, policy.grad)


# ---- the engine against transformers + autograd ------------------------------------------------------------
def random_pairs(steps, pairs, seq=14, vocab=96, seed=3):
    """Micro-batches of rows 2k (chosen), 2k+1 (rejected): random tokens, prompts of 3-7 tokens (labels -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2 * pairs, seq), generator=g)
        labels = ids.clone()
        for row in range(2 * pairs):
            labels[row, :int(torch.randint(3, 8, (1,), generator=g))] = IGNORE_INDEX
        out.append({"input_ids": ids, "labels": labels})
    return out


def _sequence_logps(model, batch):
    """Summed log-probs of the labelled tokens of each row (transformers, fp32)."""
    logits = model(input_ids=batch["input_ids"], use_cache=False, **{k: batch[k] for k in ("attention_mask",)
                                                                       if k in batch}).logits.float()
    labels = batch["labels"][:, 1:]
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logps * (labels != IGNORE_INDEX)).sum(1), (labels != IGNORE_INDEX).sum(1).double()


def torch_dpo_train(model, batches, *, beta, eps, loss_type, grad_accum_steps=1, lr, weight_decay, betas, eps_adam,
                    max_grad_norm):
    """DPO with torch.autograd, the frozen starting model as reference, torch AdamW: per-step loss and metrics."""
    reference = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps_adam, weight_decay=weight_decay)
    history = []
    for start in range(0, len(batches), grad_accum_steps):
        group = batches[start:start + grad_accum_steps]
        pairs = sum(b["input_ids"].shape[0] // 2 for b in group)
        opt.zero_grad()
        entry = dict.fromkeys(METRICS, 0.0)
        for b in group:
            policy, lengths = _sequence_logps(model, b)
            with torch.no_grad():
                ref, _ = _sequence_logps(reference, b)
            losses = _formula(policy, ref, lengths, beta, eps, loss_type)
            (losses.sum() / pairs).backward()
            rewards = beta * (policy.detach() - ref)
            chosen, rejected = rewards[0::2], rewards[1::2]
            for key, value in (("loss", losses.detach()), ("rewards/chosen", chosen), ("rewards/rejected", rejected),
                               ("rewards/accuracies", (chosen > rejected).float()),
                               ("rewards/margins", chosen - rejected), ("logps/chosen", policy.detach()[0::2]),
                               ("logps/rejected", policy.detach()[1::2])):
                entry[key] += float(value.sum()) / pairs
        entry["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        opt.step()
        history.append(entry)
    return history


def _engine(src, **train):
    return ht.Engine(ht.ModelConfig.from_pretrained(src),
                     ht.TrainConfig(**OPT, compute_dtype="float32", device="cpu", objective="dpo", **train))


def _with_reference(engine, batches):
    """The batches with the engine's reference log-probs (rows of different lengths: each row's own)."""
    out = []
    for b, ref in zip(batches, engine.reference_logps(batches)):
        ragged = isinstance(b["input_ids"], list)
        out.append(dict(b, ref_logps=[r[:len(ids)] for r, ids in zip(ref, b["input_ids"])] if ragged else ref))
    return out


@pytest.mark.parametrize("family, loss_type, eps, accum, head_rows", [
    ("llama", "sigmoid", 0.0, 1, None),
    ("qwen2", "sigmoid", 0.1, 2, None),        # tied embeddings, label smoothing, gradient accumulation
    ("llama", "robust", 0.1, 1, 40),           # the head in vocabulary chunks of 40 rows
    ("llama", "hinge", 0.0, 1, None),
    ("qwen3", "ipo", 0.0, 2, None),
])
def test_engine_matches_torch_autograd_dpo(tmp_path, family, loss_type, eps, accum, head_rows):
    make_hf_model(family, tmp_path / "src")
    batches = random_pairs(3 * accum, pairs=2)
    engine = _engine(tmp_path / "src", dpo_beta=0.5, dpo_label_smoothing=eps, dpo_loss=loss_type,
                     grad_accum_steps=accum, head_chunk_rows=head_rows)
    history = engine.fit(_with_reference(engine, batches))
    model = load_hf(tmp_path / "src")
    want = torch_dpo_train(model, batches, beta=0.5, eps=eps, loss_type=loss_type, grad_accum_steps=accum,
                           lr=OPT["lr"], weight_decay=0.0, betas=OPT["betas"], eps_adam=OPT["eps"],
                           max_grad_norm=OPT["max_grad_norm"])
    assert len(history) == len(want) == 3
    for got, ref in zip(history, want):
        assert got["pairs"] == 2 * accum
        for key in METRICS + ("grad_norm",):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
    assert history[0]["rewards/margins"] == 0 and history[1]["rewards/margins"] != 0   # the reference: the start
    _assert_weights_match(engine, model, tmp_path / "out")


def test_packed_pairs_equal_pairs_in_rows(tmp_path):
    """A pair packed in one row (chosen then rejected, position ids restarting) gives the numbers of the same
    two sequences in rows 2k, 2k+1 (right-padded, attention_mask)."""
    make_hf_model("llama", tmp_path / "src")
    g = torch.Generator().manual_seed(5)
    pairs = []
    for _ in range(4):
        seqs = []
        for n in (int(torch.randint(6, 12, (1,), generator=g)), int(torch.randint(6, 12, (1,), generator=g))):
            ids = torch.randint(0, 96, (n,), generator=g).tolist()
            seqs.append((ids, [IGNORE_INDEX] * 4 + ids[4:]))
        pairs.append(seqs)
    packed = data.pack_pairs(pairs, seq_len=24, pad_id=0)
    assert len(packed) == 4
    in_rows = [{"input_ids": [s[0] for pair in pairs[k:k + 2] for s in pair],
                "labels": [s[1] for pair in pairs[k:k + 2] for s in pair]} for k in (0, 2)]
    histories = []
    for batches in ([{k: torch.stack([r[k] for r in packed[i:i + 2]]) for k in packed[0]} for i in (0, 2)], in_rows):
        engine = _engine(tmp_path / "src")
        histories.append(engine.fit(_with_reference(engine, batches)))
    for a, b in zip(*histories):
        for key in METRICS + ("grad_norm",):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_dpo_through_triton_kernels_matches_torch_path(tmp_path, monkeypatch):
    """The head's per-token weights through the Triton kernels (interpreter) give the torch path's numbers."""
    make_hf_model("llama", tmp_path / "src", num_attention_heads=2, num_key_value_heads=1)   # head dim 32
    batches = random_pairs(2, pairs=1, seq=10)
    runs = []
    for backend in ("torch", "interpret"):
        monkeypatch.setenv("HORIZON_KERNELS", backend)
        engine = _engine(tmp_path / "src", dpo_beta=0.5)
        assert set(engine.kernel_report.values()) == ({"reference", "library"} if backend == "torch"
                                                      else {"triton-interpret"})
        runs.append((engine.fit(_with_reference(engine, batches)), engine))
    (torch_run, torch_engine), (triton_run, triton_engine) = runs
    for a, b in zip(torch_run, triton_run):
        for key in METRICS + ("grad_norm",):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    torch_engine.optimizer.wait_all()
    triton_engine.optimizer.wait_all()
    for a, b in zip(torch_engine.store.working, triton_engine.store.working):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_bf16_dpo_close_to_fp32(tmp_path):
    make_hf_model("llama", tmp_path / "src")
    batches = random_pairs(3, pairs=2)
    runs = []
    for dtype in ("float32", "bfloat16"):
        engine = ht.Engine(ht.ModelConfig.from_pretrained(tmp_path / "src"),
                           ht.TrainConfig(**OPT, compute_dtype=dtype, device="cpu", objective="dpo", dpo_beta=0.5))
        runs.append(engine.fit(_with_reference(engine, batches)))
    for a, b in zip(*runs):
        assert b["loss"] == pytest.approx(a["loss"], abs=0.02)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=0.05)
    assert runs[1][0]["loss"] == pytest.approx(0.6931, abs=1e-3)     # the reference is the starting policy


# ---- the engine against TRL --------------------------------------------------------------------------------
CONVERSATIONS = [
    ("what color is the sky ?", "blue .", "green grass ."),
    ("how many legs has a dog ?", "four .", "two legs ."),
    ("tell me about the cat", "the cat sat on the mat .", "no ."),
    ("hello , what is my name ?", "you are bot .", "a red dog ran under the rug ."),
    ("is the grass green ?", "yes .", "no , the grass is blue ."),
    ("did the dog sit ?", "yes , the dog sat .", "the cat ran ."),
    ("what is the sky ?", "the sky is blue .", "a rug ."),
    ("hi", "hello , how are you ?", "no ."),
]


def _conversational(n=len(CONVERSATIONS)):
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in CONVERSATIONS[:n]]


def _trl_trainer(tmp_path, model, tokenizer, records, *, pairs, accum, steps, beta, loss_type="sigmoid", eps=0.0):
    """TRL's DPOTrainer set up as the engine runs: the reference log-probs precomputed from the starting model,
    no truncation, the data in order, fp32 on CPU, torch AdamW with a constant lr, dropout off (its default)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from torch.utils.data import SequentialSampler

    class InOrder(trl.DPOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=pairs,
                         gradient_accumulation_steps=accum, max_steps=steps, learning_rate=OPT["lr"],
                         lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=OPT["betas"][0],
                         adam_beta2=OPT["betas"][1], adam_epsilon=OPT["eps"], max_grad_norm=OPT["max_grad_norm"],
                         optim="adamw_torch", logging_steps=1, report_to=[], use_cpu=True, bf16=False, fp16=False,
                         beta=beta, loss_type=[loss_type], label_smoothing=eps, precompute_ref_log_probs=True,
                         max_length=None, save_strategy="no", seed=0, dataloader_num_workers=0,
                         disable_tqdm=True)
    return InOrder(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer)


@pytest.mark.parametrize("loss_type, eps, accum", [("sigmoid", 0.0, 1), ("robust", 0.2, 2), ("ipo", 0.0, 1),
                                                    ("hinge", 0.0, 1)])
def test_engine_matches_trl_dpo_trainer(tmp_path, loss_type, eps, accum):
    """Same records, model and optimizer: per-step loss, rewards, log-probs and gradient norm as TRL logs them,
    and the updated weights, within 1e-4. The engine's batches are its own data pipeline's (each pair packed in
    one row), TRL's its own tokenization and padded [chosen..., rejected...] batches."""
    pytest.importorskip("trl")
    tokenizer = make_tokenizer(tmp_path / "src", style="chatml")
    make_hf_model("llama", tmp_path / "src", vocab_size=len(tokenizer))
    records, pairs, steps = _conversational(), 2, 4 // accum
    trainer = _trl_trainer(tmp_path, load_hf(tmp_path / "src"), tokenizer, records, pairs=pairs, accum=accum,
                           steps=steps, beta=0.5, loss_type=loss_type, eps=eps)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/chosen" in h]

    encoded = [data.encode_preference(data.normalize_preference(r, f"record {n}"), tokenizer)
               for n, r in enumerate(records)]
    rows = data.pack_pairs(encoded, seq_len=64, pad_id=tokenizer.pad_token_id)
    assert len(rows) == len(records)                            # a pair a row, in order
    engine = _engine(tmp_path / "src", dpo_beta=0.5, dpo_loss=loss_type, dpo_label_smoothing=eps,
                     grad_accum_steps=accum)
    preference.add_reference(engine, rows, batch_size=3)
    history = engine.fit(data.RowLoader(rows, pairs, steps=steps, grad_accum=accum, shuffle=False))
    assert len(history) == len(logged) == steps
    for got, want in zip(history, logged):
        for key in METRICS + ("grad_norm",):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    _assert_weights_match(engine, trainer.model, tmp_path / "out")


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_response_masks_match_trl_tokenization(tmp_path, style):
    """Our rendering of preference records (TRL's explicit and implicit prompts, LLaMA-Factory's Alpaca and
    ShareGPT forms) gives TRL's token ids, and the trained tokens are TRL's completion tokens (with these
    word-level tokenizers no whitespace token follows the end of turn, which TRL trains and we do not)."""
    pytest.importorskip("trl")
    tokenizer = make_tokenizer(style=style)
    make_hf_model("llama", tmp_path / "src", vocab_size=len(tokenizer))
    from trl.data_utils import extract_prompt
    implicit = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ."}],
                "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no ."}]}
    assert data.normalize_preference(implicit, "record") == extract_prompt(implicit)
    trl_records = _conversational(4) + [extract_prompt(implicit)]
    factory = [{"instruction": "what color is the sky", "input": "?", "chosen": "blue .", "rejected": "red ."},
               {"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "hello ."},
                "rejected": {"from": "gpt", "value": "no ."}}]
    as_trl = [{"prompt": [{"role": "user", "content": "what color is the sky\n?"}],
               "chosen": [{"role": "assistant", "content": "blue ."}],
               "rejected": [{"role": "assistant", "content": "red ."}]},
              {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello ."}],
               "rejected": [{"role": "assistant", "content": "no ."}]}]
    trainer = _trl_trainer(tmp_path, load_hf(tmp_path / "src"), tokenizer, trl_records + as_trl, pairs=1, accum=1,
                           steps=1, beta=0.1)
    for record, tokenized in zip(trl_records + factory, trainer.train_dataset):
        ours = data.encode_preference(data.normalize_preference(record, "record"), tokenizer)
        prompt = tokenized["prompt_ids"]
        for (ids, labels), completion in zip(ours, (tokenized["chosen_ids"], tokenized["rejected_ids"])):
            assert ids == prompt + completion
            assert [t for t, label in zip(ids, labels) if label != IGNORE_INDEX] == completion
            assert all(label == IGNORE_INDEX for label in labels[:len(prompt)])


# ---- data and errors ---------------------------------------------------------------------------------------
def test_string_pairs_follow_the_prompt_response_rendering():
    """Three strings render as the SFT's prompt/response records: without a chat template, prompt, newline,
    response and eos (TRL joins them with no newline); the response and eos trained."""
    tokenizer = make_tokenizer()
    pair = data.normalize_preference({"prompt": "the cat", "chosen": "sat .", "rejected": "ran"}, "line 1")
    assert pair == {"prompt": "the cat", "chosen": "sat .", "rejected": "ran"}
    (ids, labels), (ids_r, labels_r) = data.encode_preference(pair, tokenizer)
    assert (ids, labels) == data.encode_record({"prompt": "the cat", "response": "sat ."}, tokenizer)
    assert tokenizer.decode([t for t, label in zip(ids_r, labels_r) if label != IGNORE_INDEX]) == "ran </s>"


def test_records_errors_name_the_line():
    with pytest.raises(ValueError, match=r'data.jsonl:3: "rejected" is missing'):
        data.normalize_preference({"prompt": "hi", "chosen": "yes"}, "data.jsonl:3")
    with pytest.raises(ValueError, match=r'line 2: "chosen" must be a string or a list of assistant turns'):
        data.normalize_preference({"prompt": "hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "n"},
                                  "line 2")
    with pytest.raises(ValueError, match="start with the same turns"):
        data.normalize_preference({"chosen": [{"role": "assistant", "content": "a"}],
                                   "rejected": [{"role": "assistant", "content": "b"}]}, "line 4")


def test_pairs_too_long_for_a_row():
    chosen, rejected = (list(range(10)), [IGNORE_INDEX] * 3 + list(range(3, 10))), \
                       (list(range(20, 36)), [IGNORE_INDEX] * 3 + list(range(23, 36)))
    with pytest.raises(ValueError, match=r"pair 0 has 10 \+ 16 tokens .* more than --seq-len 20"):
        data.pack_pairs([(chosen, rejected)], seq_len=20, pad_id=0)
    rows = data.pack_pairs([(chosen, rejected)], seq_len=20, pad_id=0, too_long="truncate")
    assert rows[0]["position_ids"].tolist() == list(range(10)) + list(range(10))       # 10 + 10 tokens
    packer = data.Packer(20, 0, "drop")
    assert packer.add_pair(chosen, rejected) == [] and packer.stats.too_long == 1


def test_bad_micro_batches_are_refused(tmp_path):
    make_hf_model("llama", tmp_path / "src")
    engine = _engine(tmp_path / "src")
    batch = random_pairs(1, pairs=2)[0]
    odd = {k: v[:3] for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"batch 0: 3 sequences, an odd number: .* pair split across micro-batches"):
        list(engine.reference_logps([odd]))
    empty = dict(batch, labels=batch["labels"].clone())
    empty["labels"][3] = IGNORE_INDEX
    with pytest.raises(ValueError, match=r"sequence 3 \(rejected of pair 1\) has no response tokens"):
        list(engine.reference_logps([empty]))
    with pytest.raises(ValueError, match=r"batch 0: no 'ref_logps' .* engine.reference_logps"):
        engine.fit([batch])
    packed = data.pack_pairs([[(list(range(5)), [IGNORE_INDEX, 1, 2, 3, 4])] * 2], seq_len=12, pad_id=0)[0]
    packed["labels"][5] = 0                                        # the rejected's first token labelled
    with pytest.raises(ValueError, match=r"row 0, position 5 is labelled but starts a packed sequence"):
        list(engine.reference_logps([{k: v[None] for k, v in packed.items()}]))
    with pytest.raises(ValueError, match="dpo_loss must be"):
        ht.TrainConfig(objective="dpo", dpo_loss="kto")


# ---- learning ----------------------------------------------------------------------------------------------
def addition_dpo_setup(out_dir):
    """(engine, train rows, held-out rows) of the synthetic preference set: the demo's model fine-tuned on sums for
    60 steps (the reference), 512 training pairs (right sum, one digit wrong) and the task's 64 held-out problems
    as pairs, their reference log-probs attached (perf/test_dpo_perf.py draws its accuracy curve from it too)."""
    torch.manual_seed(0)
    task = data.AdditionTask(min_digits=1, max_digits=2, num_heldout=64, seed=0, pad=True)
    sft = ht.Engine(ht.preset("demo"), ht.TrainConfig(lr=3e-3, compute_dtype="float32", device="cpu",
                                                      warmup_steps=10))
    sft.fit(task.batches(32), max_steps=60)
    sft.save_pretrained(out_dir / "sft")
    engine = ht.Engine(ht.ModelConfig.from_pretrained(out_dir / "sft"),
                       ht.TrainConfig(lr=1e-3, compute_dtype="float32", device="cpu", objective="dpo", dpo_beta=0.1))
    rng = random.Random(1)
    train = [task.preference_pair(task.draw(rng), rng) for _ in range(512)]
    held = [task.preference_pair(p, rng) for p in task.heldout]
    return engine, *(preference.add_reference(engine, data.pack_pairs(pairs, 2 * task.seq_len, task.tokenizer.pad_id),
                                              64) for pairs in (train, held))


@pytest.mark.slow
def test_dpo_raises_preference_accuracy_on_addition(tmp_path):
    """The demo's model, briefly fine-tuned on sums, then DPO on (right sum, one digit wrong) pairs: the held-out
    pairs' reward accuracy (the policy prefers the right sum more than the reference did) rises clearly, and so
    does the training pairs'. About 20 s on 2 cores."""
    torch.set_num_threads(1)
    engine, rows, held = addition_dpo_setup(tmp_path)
    before = engine.evaluate_preferences(data.RowLoader(held, 64, epochs=1, shuffle=False))
    history = engine.fit(data.RowLoader(rows, 32, steps=150))
    after = engine.evaluate_preferences(data.RowLoader(held, 64, epochs=1, shuffle=False))
    # at the start the policy is the reference: every reward 0, no pair counted as preferred (TRL's convention)
    assert before["rewards/accuracies"] == 0.0 and before["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert after["rewards/accuracies"] > 0.7 and after["loss"] < 0.5, after                   # measured: 0.83, 0.37
    accuracy = [sum(e["rewards/accuracies"] for e in history[a:a + 25]) / 25 for a in (0, 125)]
    assert accuracy[1] > accuracy[0] + 0.05, accuracy                                         # measured: 0.66, 0.78


# ---- the command line --------------------------------------------------------------------------------------
def test_cli_dpo_run_with_reference_pass_eval_and_resume(tmp_path, capsys):
    import json

    from horizon_triton import cli
    src = tmp_path / "src"
    tokenizer = make_tokenizer(src, style="chatml")
    make_hf_model("llama", src, vocab_size=len(tokenizer), max_position_embeddings=256)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in _conversational()))
    out = tmp_path / "out"
    args = ["train", "--model", str(src), "--data", str(prefs), "--out", str(out), "--device", "cpu", "--dtype",
            "float32", "--objective", "dpo", "--dpo-beta", "0.5", "--seq-len", "64", "--batch-size", "2",
            "--eval-split", "0.25", "--lr", "2e-3", "--threads", "1"]
    assert cli.main(args + ["--steps", "4", "--save-every", "2"]) == 0
    printed = capsys.readouterr().out
    # the eval split holds out 3 of the 8 records (data.in_eval_split); a pair a row
    assert "reference log-probs of 5 train rows" in printed and "reference log-probs of 3 eval rows" in printed
    assert (out / "reference" / "train.ref").stat().st_size == 5 * 64 * 4
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resume = ["--resume", str(out / "checkpoints" / "step-00000002")]
    assert cli.main(args + ["--steps", "4", "--save-every", "2"] + resume) == 0   # reuses the first reference
    assert "reference log-probs" not in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(first, lines):                                     # the resumed run: the same numbers
        key = "loss" if a["kind"] == "train" else "eval_loss"
        assert a["kind"] == b["kind"] and a[key] == pytest.approx(b[key], rel=1e-6)
    train = [m for m in lines if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert train[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and train[0]["rewards/margins"] == 0
    assert all(set(preference.METRICS) <= set(m) for m in train)
    evals = [m for m in lines if m["kind"] == "eval"]
    assert evals and all("eval_rewards/accuracies" in m and m["eval_pairs"] == 3 for m in evals)
    assert cli.main(["data", "--model", str(src), "--data", str(prefs), "--objective", "dpo", "--show", "1"]) == 0
    shown = capsys.readouterr().out
    assert "prefs.jsonl:1 chosen" in shown and "\u00abblue . <|im_end|>\u00bb" in shown
    assert cli.main(args + ["--steps", "2", "--overwrite", "--train-on", "all"]) == 2


# ---- the dry run and the plan ------------------------------------------------------------------------------
def test_dry_run_of_a_dpo_step_matches_a_real_cpu_step():
    """The dry run models DPO's head (two passes even with one vocabulary chunk, the per-token weights): its held
    bytes and bus bytes are a real CPU DPO step's."""
    from horizon_triton.planning.dryrun import dry_run_shapes
    cfg = ht.ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                         num_kv_heads=2)
    train_cfg = ht.TrainConfig(device="cpu", grad_accum_steps=2, objective="dpo")
    ids = torch.arange(2 * 2 * 48).view(2, 2, 48) % cfg.vocab_size      # the dry run's ids: all distinct
    engine = ht.Engine(cfg, train_cfg)
    real = engine.fit([{"input_ids": ids[m], "labels": ids[m], "ref_logps": torch.zeros(2, 48)}
                       for m in range(2)])[0]
    dry = dry_run_shapes(cfg, train_cfg, [(2, 48), (2, 48)], kernel_backend="torch", device_memory_bytes=2**34,
                         pin_memory=False)
    sft = dry_run_shapes(cfg, replace(train_cfg, objective="sft"), [(2, 48), (2, 48)], kernel_backend="torch",
                         device_memory_bytes=2**34, pin_memory=False)
    assert dry.device_held_peak_bytes == pytest.approx(real["device_peak_bytes"], rel=0.02)
    assert (dry.h2d_bytes, dry.d2h_bytes) == (real["h2d_bytes"], real["d2h_bytes"])
    # the vocabulary fits one slot: the mean loss takes the fused head, DPO the two passes (one more logits GEMM)
    head_gemm = 2.0 * 4 * 48 * cfg.hidden_size * cfg.vocab_size
    assert dry.flops["gemm_bfloat16"] - sft.flops["gemm_bfloat16"] == pytest.approx(head_gemm, rel=1e-6)


def test_plan_of_dpo_at_8b_widths_keeps_the_device_peak():
    """Llama-3-8B, 32K tokens a step on an H100: the head is two-pass already, and DPO adds only per-token
    tensors (each target's sequence, int64, and its weight, fp32, with the weights' temporaries): the planned
    device peak is the mean loss's plus at most 32 bytes a token, and the plan reports the dry run's peak."""
    from horizon_triton.planning.dryrun import dry_run
    from horizon_triton.planning.plan import HARDWARE
    cfg, tokens = ht.preset("llama-8b"), 32768
    card = HARDWARE["h100"]["device_memory_bytes"]
    runs = {obj: dry_run(cfg, ht.TrainConfig(objective=obj), tokens_per_step=tokens, seq_len=4096,
                         device_memory_bytes=card) for obj in ("sft", "dpo")}
    extra = runs["dpo"].device_peak_bytes - runs["sft"].device_peak_bytes
    assert 0 < extra <= 32 * tokens, extra
    assert runs["dpo"].device_peak_bytes <= card
    assert (runs["dpo"].h2d_bytes, runs["dpo"].d2h_bytes) == (runs["sft"].h2d_bytes, runs["sft"].d2h_bytes)
    assert runs["dpo"].flops["gemm_bfloat16"] == runs["sft"].flops["gemm_bfloat16"]
    planned = ht.plan(cfg, ht.TrainConfig(objective="dpo"), tokens_per_step=tokens, seq_len=4096, hardware="h100",
                      find_hiding=False)
    assert planned["device_peak_bytes"] == runs["dpo"].device_peak_bytes


def test_dpo_with_lora_matches_peft_and_autograd_dpo(tmp_path):
    """DPO on LoRA adapters (the reference pass on the starting model: with B = 0, the base) against a peft model
    trained by the autograd DPO above: the two features compose without a line of their own."""
    peft = pytest.importorskip("peft")
    from test_lora import _adapters, _peft_model
    make_hf_model("llama", tmp_path / "src")
    batches = random_pairs(3, pairs=2)
    targets = ("q_proj", "v_proj", "down_proj")
    engine = _engine(tmp_path / "src", dpo_beta=0.5, lora_rank=4, lora_alpha=8, lora_targets=targets)
    model = _peft_model(tmp_path / "src", 4, 8, targets, _adapters(engine))
    assert isinstance(model, peft.PeftModel)
    history = engine.fit(_with_reference(engine, batches))
    want = torch_dpo_train(model, batches, beta=0.5, eps=0.0, loss_type="sigmoid", lr=OPT["lr"], weight_decay=0.0,
                           betas=OPT["betas"], eps_adam=OPT["eps"], max_grad_norm=OPT["max_grad_norm"])
    for got, ref in zip(history, want):
        for key in METRICS + ("grad_norm",):
            assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-5), key
    params = dict(model.named_parameters())
    for name, value in _adapters(engine).items():
        torch.testing.assert_close(value, params[name].detach(), atol=1e-4, rtol=0, msg=name)
    assert history[-1]["rewards/margins"] != 0

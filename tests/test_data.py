"""data: the addition task's masking and held-out split, JSONL checking and normalizing, packing, loaders."""
import json
import re

import pytest
import torch

from horizon_triton import data
from horizon_triton.data import IGNORE_INDEX


# ---- the addition task ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad,reverse", [(False, False), (True, False), (False, True), (True, True)])
def test_addition_labels_mask_exactly_the_prompt(pad, reverse):
    task = data.AdditionTask(num_heldout=8, pad=pad, reverse=reverse)
    tok = task.tokenizer
    batch = next(task.batches(32, seed=3))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape == (32, task.seq_len) and ids.dtype == labels.dtype == torch.long
    assert int(ids.max()) < tok.vocab_size <= 16                  # fits the demo preset
    for row_ids, row_labels in zip(ids.tolist(), labels.tolist()):
        text = tok.decode(row_ids)                                # up to the eos
        prompt, answer = text.split("=")
        a, b = (int(x) for x in prompt.split("+"))
        n_prompt = len(prompt) + 1
        assert row_labels[:n_prompt] == [IGNORE_INDEX] * n_prompt   # a, '+', b, '=' masked
        n_answer = len(answer) + 1                                  # answer digits and the eos are trained
        assert row_labels[n_prompt:n_prompt + n_answer] == row_ids[n_prompt:n_prompt + n_answer]
        assert row_ids[n_prompt + n_answer - 1] == tok.eos_id
        assert row_labels[n_prompt + n_answer:] == [IGNORE_INDEX] * (task.seq_len - n_prompt - n_answer)
        assert task.read_answer(answer) == str(a + b)
        if pad:
            assert len(prompt) == 2 * task.max_digits + 1 and len(answer) == task.max_digits + 1


def test_addition_plain_format_reads_like_arithmetic():
    task = data.AdditionTask(num_heldout=4)
    problem = data.Problem(123, 45)
    assert task.prompt(problem) + task.target(problem) == "123+45=168"
    ids, labels = task.encode(problem)
    assert task.tokenizer.decode(ids) == "123+45=168"
    assert labels == [IGNORE_INDEX] * 7 + ids[7:]
    rev = data.AdditionTask(num_heldout=4, pad=True, reverse=True)
    assert rev.prompt(problem) + rev.target(problem) == "123+045=8610"
    assert rev.read_answer(rev.target(problem)) == "168"


def test_heldout_problems_never_train_and_split_is_reproducible():
    task = data.AdditionTask(min_digits=1, max_digits=1, num_heldout=40, seed=5)   # 100 problems in all
    again = data.AdditionTask(min_digits=1, max_digits=1, num_heldout=40, seed=5)
    assert task.heldout == again.heldout and len(set(task.heldout)) == 40
    heldout = {task.prompt(p) for p in task.heldout}
    batches = task.batches(64)
    for _ in range(5):
        for row in next(batches)["input_ids"].tolist():
            assert task.tokenizer.decode(row).split("=")[0] + "=" not in heldout
    first = next(data.AdditionTask(num_heldout=4).batches(8, seed=1))
    second = next(data.AdditionTask(num_heldout=4).batches(8, seed=1))
    assert torch.equal(first["input_ids"], second["input_ids"])


def test_greedy_exact_match_with_an_oracle():
    """A logits function that knows the answers scores 100%; one that always says eos scores 0%."""
    task = data.AdditionTask(num_heldout=30, reverse=True)
    tok = task.tokenizer
    by_prompt = {task.prompt(p): task.target(p) for p in task.heldout}

    def oracle(ids):
        out = torch.zeros(*ids.shape, 16)
        for r, row in enumerate(ids.tolist()):
            text = tok.decode(row)
            prompt, _, done = text.partition("=")
            answer = by_prompt[prompt + "="] + "\0"
            nxt = answer[len(done)]
            out[r, -1, tok.eos_id if nxt == "\0" else tok.chars.index(nxt)] = 1.0
        return out

    assert data.exact_match(oracle, task) == 1.0
    eos_only = lambda ids: torch.nn.functional.one_hot(torch.full(ids.shape, tok.eos_id), 16).float()  # noqa: E731
    assert data.exact_match(eos_only, task) == 0.0


# ---- JSONL ------------------------------------------------------------------------------------------------
def _write(tmp_path, lines, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_jsonl_accepts_both_kinds_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path, [json.dumps({"text": "a b"}), "", json.dumps({"prompt": "q", "response": "r", "x": 1})])
    assert data.read_jsonl(path) == [{"text": "a b"}, {"prompt": "q", "response": "r"}]


@pytest.mark.parametrize("bad,message", [
    ('{"text": "ok"', "not valid JSON"),
    ('["text"]', "expected a JSON object"),
    ('{"body": "x"}', 'expected a "text" key'),
    ('{"prompt": "x"}', '"response" is missing'),
    ('{"response": "x"}', '"prompt" is missing'),
    ('{"text": 3}', '"text" must be a string'),
])
def test_read_jsonl_names_file_and_line_of_a_bad_line(tmp_path, bad, message):
    path = _write(tmp_path, [json.dumps({"text": "fine"}), "", bad, json.dumps({"text": "never read"})])
    with pytest.raises(ValueError, match=message) as info:
        data.read_jsonl(path)
    assert f"{path}:3" in str(info.value)


def test_alpaca_sharegpt_and_messages_become_messages(tmp_path):
    """Alpaca as LLaMA-Factory reads it (instruction, a newline, the input; a system field) and ShareGPT's
    from/value turns become the same conversation as a messages line."""
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add\n2 and 3"},
            {"role": "assistant", "content": "5"}]
    path = _write(tmp_path, [
        json.dumps({"messages": chat}),
        json.dumps({"instruction": "add", "input": "2 and 3", "output": "5", "system": "be brief"}),
        json.dumps({"conversations": [{"from": "human", "value": "add\n2 and 3"}, {"from": "gpt", "value": "5"}],
                    "system": "be brief"}),
        json.dumps({"conversations": [{"from": "system", "value": "be brief"},
                                      {"from": "user", "value": "add\n2 and 3"},
                                      {"from": "assistant", "value": "5"}]}),
        json.dumps({"instruction": "add 2 and 3", "input": "", "output": "5"}),
    ])
    records = data.read_jsonl(path)
    assert records[:4] == [{"messages": chat}] * 4
    assert records[4] == {"messages": [{"role": "user", "content": "add 2 and 3"},
                                       {"role": "assistant", "content": "5"}]}


@pytest.mark.parametrize("bad,message", [
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot' is not one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0]: 'content' must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}, "from 'robot'"),
    ({"instruction": "add"}, '"output" is missing (an Alpaca line'),
])
def test_chat_formats_name_the_bad_turn(tmp_path, bad, message):
    path = _write(tmp_path, [json.dumps(bad)])
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        data.read_jsonl(path)
    assert f"{path}:1" in str(info.value)


def test_read_jsonl_names_the_line_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9"):
        data.read_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_read_jsonl_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="holds no records"):
        data.read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        data.read_jsonl(tmp_path / "missing.jsonl")


# ---- packing ----------------------------------------------------------------------------------------------
def test_pack_positions_restart_at_each_document():
    docs = [([5, 6, 7], [5, 6, 7]), ([8, 9], [IGNORE_INDEX, 9]), ([3, 4, 5, 6], [3, 4, 5, 6])]
    rows = data.pack_documents(docs, seq_len=6, pad_id=0)
    assert len(rows) == 2
    assert rows[0]["input_ids"].tolist() == [5, 6, 7, 8, 9, 0]
    assert rows[0]["position_ids"].tolist() == [0, 1, 2, 0, 1, 2]       # the padding keeps counting
    assert rows[0]["labels"].tolist() == [IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]
    assert rows[1]["input_ids"].tolist() == [3, 4, 5, 6, 0, 0]
    assert rows[1]["position_ids"].tolist() == [0, 1, 2, 3, 4, 5]
    assert rows[1]["labels"].tolist() == [IGNORE_INDEX, 4, 5, 6, IGNORE_INDEX, IGNORE_INDEX]


def test_pack_never_splits_a_document():
    """A document longer than seq_len is dropped, truncated or refused, and counted; one left with nothing to
    train is skipped."""
    long_doc = (list(range(10)), list(range(10)))
    short = ([7, 8, 9], [IGNORE_INDEX, 8, 9])
    with pytest.raises(ValueError, match="document 0 has 10 tokens, more than --seq-len 4"):
        data.pack_documents([long_doc, short], seq_len=4, pad_id=99)
    stats = data.DataStats()
    packer = data.Packer(4, 99, "drop", stats)
    rows = packer.add(*long_doc) + packer.add(*short) + packer.add([5, 6], [IGNORE_INDEX] * 2) + packer.flush()
    assert [r[0].tolist() for r in rows] == [[7, 8, 9, 99]]
    assert (stats.too_long, stats.untrained, stats.rows, stats.tokens, stats.trained_tokens, stats.longest) == \
        (1, 1, 1, 3, 2, 10)
    rows = data.pack_documents([long_doc], seq_len=4, pad_id=99, too_long="truncate")
    assert [r["input_ids"].tolist() for r in rows] == [[0, 1, 2, 3]]
    assert rows[0]["labels"].tolist() == [IGNORE_INDEX, 1, 2, 3]


def test_row_file_round_trips(tmp_path):
    docs = [([5, 6, 7], [5, 6, 7]), ([8, 9], [IGNORE_INDEX, 9]), ([3, 4, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 5, 6])]
    rows = data.pack_documents(docs, seq_len=6, pad_id=0)
    writer = data.packing.RowWriter(tmp_path / "r.rows", 6)
    packer = data.Packer(6, 0)
    for ids, labels in docs:
        for row in packer.add(ids, labels):
            writer.write(*row)
    for row in packer.flush():
        writer.write(*row)
    writer.close()
    stored = data.PackedRows(tmp_path / "r.rows", 6, 0, len(rows))
    assert len(stored) == 2 and (tmp_path / "r.rows").stat().st_size == 2 * 6 * 5
    for i, row in enumerate(rows):
        for key in ("input_ids", "labels", "position_ids"):
            assert stored[i][key].tolist() == row[key].tolist(), key
    with pytest.raises(IndexError):
        stored[2]
    stored.close()


def test_packed_batch_equals_separate_documents_in_the_engine():
    """A packed row gives each document the loss and logits it has alone (positions restart, no cross-talk)."""
    import horizon_triton as ht
    engine = ht.Engine(ht.preset("tiny"), ht.TrainConfig(device="cpu", compute_dtype="float32"))
    a, b = [3, 9, 4, 7, 1], [5, 2, 8]
    row = data.pack_documents([(a, a), (b, b)], seq_len=10, pad_id=0)[0]
    packed = engine.logits(row["input_ids"][None], row["position_ids"][None])[0]
    alone_a = engine.logits(torch.tensor([a]))[0]
    alone_b = engine.logits(torch.tensor([b]))[0]
    torch.testing.assert_close(packed[:5], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[5:8], alone_b, atol=1e-5, rtol=1e-5)
    engine.close()


def test_row_loader_batches_steps_and_reshuffles():
    docs = [([i, i + 1, i + 2], [i, i + 1, i + 2]) for i in range(10)]
    rows = data.pack_documents(docs, seq_len=3, pad_id=0)
    loader = data.RowLoader(rows, batch_size=4, steps=5, grad_accum=2, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 10
    assert set(batches[0]) == {"input_ids", "labels", "position_ids"}
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2] * 3 + [4]     # a pass ends with a smaller batch
    assert all(b["input_ids"].shape[1] == 3 and b["input_ids"].dtype == torch.long for b in batches)
    firsts = [int(r[0]) for b in batches[:5] for r in b["input_ids"]][:10]
    assert sorted(firsts) == list(range(10))          # the first pass sees every row once
    assert data.steps_per_epoch(10, 4, 2) == 2
    with pytest.raises(ValueError, match="no row has a token to train on"):
        data.RowLoader(data.pack_documents([([1, 2], [IGNORE_INDEX] * 2)], 4, 0), 2, 1)


def test_row_loader_epochs_see_every_row_once_and_eval_keeps_order():
    rows = data.pack_documents([([i, i + 1], [i, i + 1]) for i in range(7)], seq_len=2, pad_id=0)
    loader = data.RowLoader(rows, batch_size=3, epochs=2, seed=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 6 and [len(b["input_ids"]) for b in batches] == [3, 3, 1] * 2
    for epoch in (batches[:3], batches[3:]):
        assert sorted(int(r[0]) for b in epoch for r in b["input_ids"]) == list(range(7))
    ordered = data.RowLoader(rows, batch_size=3, epochs=1, shuffle=False)
    assert [int(r[0]) for b in ordered for r in b["input_ids"]] == list(range(7))
    with pytest.raises(ValueError, match="steps or epochs"):
        data.RowLoader(rows, 3, steps=2, epochs=1)

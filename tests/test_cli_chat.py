"""The chat fine-tune end to end (a tiny Llama saved with a ChatML tokenizer, chat JSONL, --epochs; the result
answers in transformers), and the run options around it: validation, --config, the data command, TensorBoard,
the plot, --version, the help text, demo options refused."""
import importlib.util
import json
import sys

import pytest
import torch
import transformers

from hf_reference import load_hf, make_hf_model
from horizon_triton import cli
from horizon_triton import data as data_module
from tiny_tokenizers import make_tokenizer

QA = [("what color is the sky ?", "blue ."),
      ("what color is the grass ?", "green ."),
      ("how many legs has a cat ?", "four legs ."),
      ("hello", "hi , my name is bot .")]


def _chat(question, answer, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": turns + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def chat_model(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama", src, max_position_embeddings=256)
    make_tokenizer(src, style="chatml")
    return src


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _args(src, data, out, *extra):
    return ["train", "--model", str(src), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--dtype", "float32", *extra]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_chat_finetune_counts_assistant_tokens_and_answers_in_transformers(tmp_path, chat_model):
    records = [_chat(q, a, system="you are a bot ." if i % 2 else None) for i, (q, a) in enumerate(QA)]
    data = _jsonl(tmp_path / "chat.jsonl", records)
    out = tmp_path / "out"
    epochs = 60
    assert cli.main(_args(chat_model, data, out, "--epochs", str(epochs), "--batch-size", "1", "--seq-len", "64",
                          "--lr", "3e-3", "--threads", "1")) == 0
    train = [m for m in _metrics(out) if m["kind"] == "train"]
    assert len(train) % epochs == 0
    per_epoch = len(train) // epochs
    # the loss counts the assistant turns (content and <|im_end|>), never the system or user turns
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assistant = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for _, a in QA)
    for epoch in range(epochs):
        assert sum(m["tokens"] for m in train[epoch * per_epoch:(epoch + 1) * per_epoch]) == assistant
    first, last = train[0]["loss"], train[-1]["loss"]
    assert last < 0.1 * first, (first, last)
    # the saved model, prompted through the chat template, answers what it was trained on
    model = load_hf(out)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for question, answer in QA:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=end,
                                       pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        assert reply.strip() == answer, question
    if importlib.util.find_spec("matplotlib"):        # the plot extra (absent on the GPU machine: no plot, said)
        assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_split_config_file_and_tensorboard(tmp_path, chat_model, capsys):
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the tensorboard extra")
    records = [_chat(q, a) for q, a in QA] * 5
    data = _jsonl(tmp_path / "chat.jsonl", records)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text("steps: 9\nbatch-size: 2\nseq_len: 64\nlr: 0.003\neval_split: 0.25\neval-every: 2\n"
                      "report_to: tensorboard\ncosine: true\n")
    assert cli.main(_args(chat_model, data, out, "--config", str(config), "--steps", "5")) == 0   # flags win
    lines = _metrics(out)
    assert [m["step"] for m in lines if m["kind"] == "train"] == [1, 2, 3, 4, 5]
    evals = [m for m in lines if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [2, 4, 5] and all(m["eval_loss"] > 0 for m in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    train = [m for m in lines if m["kind"] == "train"]
    assert train[-1]["lr"] < train[0]["lr"]                    # cosine: true from the file
    printed = capsys.readouterr().out
    held = [data_module.in_eval_split(i, 0.25, 0) for i in range(len(records))].count(True)
    assert f"eval data: {held} records" in printed and f"train data: {len(records) - held} records" in printed
    # TensorBoard scalars, read back with its own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert [e.value for e in board.Scalars("eval/loss")] == pytest.approx([m["eval_loss"] for m in evals])
    assert (out / "config.json").is_file()
    assert (out / "metrics.png").is_file() == bool(importlib.util.find_spec("matplotlib"))


def test_eval_data_file_and_a_run_without_matplotlib(tmp_path, chat_model, capsys, monkeypatch):
    data = _jsonl(tmp_path / "chat.jsonl", [_chat(q, a) for q, a in QA])
    held = _jsonl(tmp_path / "held.jsonl", [_chat(q, a) for q, a in QA[:2]])
    out = tmp_path / "out"
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib raises ImportError
    assert cli.main(_args(chat_model, data, out, "--steps", "2", "--eval-data", str(held), "--seq-len", "64")) == 0
    assert [m["step"] for m in _metrics(out) if m["kind"] == "eval"] == [2]
    assert 'no plot: the loss plot needs matplotlib: pip install "horizon-triton[plot]"' in capsys.readouterr().out
    assert not (out / "metrics.png").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--format", "pad"], "--format: demo options"),
    (["--eval-problems", "3"], "--eval-problems: demo options"),
    (["--eval-split", "0.5", "--eval-data", "x.jsonl"], "give one of them"),
    (["--seq-len", "1000"], "above the model's max_position_embeddings 256"),
    (["--eval-every", "2"], "--eval-every needs an eval set"),
])
def test_finetune_refuses_options_that_do_not_apply(tmp_path, chat_model, capsys, extra, message):
    data = _jsonl(tmp_path / "chat.jsonl", [_chat(q, a) for q, a in QA])
    assert cli.main(_args(chat_model, data, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "unknown option 'stepz'" in capsys.readouterr().err
    bad.write_text("cosine: 3\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "cosine is a switch" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_data_command_shows_what_is_trained(tmp_path, chat_model, capsys):
    records = [_chat(q, a) for q, a in QA] + [{"text": " ".join(["the cat sat ."] * 30)}]
    data = _jsonl(tmp_path / "chat.jsonl", records)
    assert cli.main(["data", "--model", str(chat_model), "--data", str(data), "--show", "2", "--seq-len", "40"]) == 0
    printed = capsys.readouterr().out
    assert f"{data}:1:" in printed and f"{data}:2:" in printed and f"{data}:3:" not in printed
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(chat_model))
    for answer in ("blue .", "green ."):                 # the answer and its end of turn, marked as trained
        marked = tokenizer.decode(tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
        assert f"«{marked}»" in printed
    assert printed.count("«") == 1 + 2 and "what color is the sky ?" in printed   # the prompt is shown, not marked
    assert "5 records -> " in printed and "1 longer than 40 (dropped; longest 121)" in printed


def test_version_and_help_text(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("horizon-triton ")
    for command in (["--help"], ["train", "--help"], ["data", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(command)
        text = capsys.readouterr().out
        assert "``" not in text and "%" not in text and "usage: horizon-triton" in text

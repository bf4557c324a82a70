"""The command line (horizon_triton/cli/): the fine-tune job end to end on a tiny Llama with its own tokenizer, its
errors before training, the demo run (a few steps; its accuracy is measured by hand, not here), and the progress
line."""
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import transformers

from hf_reference import load_hf, make_hf_model
from horizon_triton import cli
from tiny_tokenizers import make_tokenizer

@pytest.fixture
def checkpoint(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama", src)                # vocab 96 > the tokenizer's 24 ids
    make_tokenizer(src)
    return src


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"text": "the cat sat on the mat ."},
    {"prompt": "what did the dog do ?", "response": "the dog ran under the rug ."},
    {"text": "a big red dog sat on a small blue rug ."},
    {"prompt": "did the cat sit ?", "response": "yes ."},
] * 3


def _finetune_args(src, data, out, *extra):
    return ["train", "--model", str(src), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--dtype", "float32", *extra]


def test_finetune_end_to_end(tmp_path, checkpoint, capsys):
    data = _jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    rc = cli.main(_finetune_args(checkpoint, data, out, "--steps", "4", "--batch-size", "2", "--seq-len", "24",
                                 "--grad-accum", "2", "--lr", "1e-3"))
    assert rc == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(line["kind"] == "train" and line["loss"] > 0 and line["tokens"] > 0 for line in lines)
    assert {"lr", "grad_norm", "tokens_per_s", "device_peak_bytes", "host_rss_peak_bytes"} <= set(lines[0])
    # the result is a checkpoint transformers loads, with changed weights, and a tokenizer that loads too
    tuned, original = load_hf(out), load_hf(checkpoint)
    assert not torch.equal(tuned.model.embed_tokens.weight, original.model.embed_tokens.weight)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tokenizer("the cat sat")["input_ids"]])
    assert torch.isfinite(tuned(input_ids=ids).logits).all()
    printed = capsys.readouterr().out
    assert "step 4/4" in printed and "tok/s" in printed and "MiB" in printed


def test_finetune_default_is_three_epochs(tmp_path, checkpoint, capsys):
    data = _jsonl(tmp_path / "train.jsonl", RECORDS[:4])
    out = tmp_path / "out"
    assert cli.main(_finetune_args(checkpoint, data, out, "--batch-size", "1", "--seq-len", "64")) == 0
    steps = len((out / "metrics.jsonl").read_text().splitlines())
    printed = capsys.readouterr().out
    assert f"{steps} steps = 3 epochs of {steps // 3}" in printed and steps % 3 == 0
    assert "warning: only" in printed                 # a tiny run says so


@pytest.mark.parametrize("lines,message", [
    ([json.dumps({"text": "the cat"}), "{not json"], "train.jsonl:2: not valid JSON"),
    ([json.dumps({"prompt": "the cat"})], 'train.jsonl:1: "response" is missing'),
    ([json.dumps({"words": "the cat"})], 'train.jsonl:1: expected a "text" key'),
    ([], "holds no records"),
])
def test_finetune_data_errors_before_training(tmp_path, checkpoint, capsys, lines, message):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "out"
    assert cli.main(_finetune_args(checkpoint, data, out)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()                     # nothing trained, nothing written


def test_finetune_without_tokenizer_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "bare"
    make_hf_model("llama", src)
    data = _jsonl(tmp_path / "train.jsonl", RECORDS)
    assert cli.main(_finetune_args(src, data, tmp_path / "out")) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_finetune_tokenizer_larger_than_the_model_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "small"
    make_hf_model("llama", src, vocab_size=12)     # the tokenizer has 24 ids
    make_tokenizer(src)
    data = _jsonl(tmp_path / "train.jsonl", RECORDS)
    assert cli.main(_finetune_args(src, data, tmp_path / "out")) == 2
    assert "does not belong to this model" in capsys.readouterr().err


def test_finetune_refuses_to_overwrite_its_source(tmp_path, checkpoint, capsys):
    data = _jsonl(tmp_path / "train.jsonl", RECORDS)
    assert cli.main(_finetune_args(checkpoint, data, checkpoint)) == 2
    assert "--out" in capsys.readouterr().err


def test_demo_runs_and_writes_metrics(tmp_path):
    """The no-argument job, shortened, through ``python -m`` (as a user runs it, with a pipe: plain lines)."""
    out = tmp_path / "demo"
    env = dict(os.environ, HORIZON_KERNELS="torch")
    result = subprocess.run([sys.executable, "-m", "horizon_triton.cli", "train", "--steps", "6", "--eval-every", "3",
                             "--eval-problems", "16", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout
    assert "step 6/6" in result.stdout and "held-out exact match" in result.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [line["step"] for line in lines if line["kind"] == "eval"] == [0, 3, 6]
    assert all(0.0 <= line["exact_match"] <= 1.0 for line in lines if line["kind"] == "eval")
    assert (out / "config.json").is_file()


def test_demo_reruns_into_its_default_directory(tmp_path, monkeypatch):
    """`horizon-triton train` twice: the second run replaces runs/demo (it holds only an earlier demo), while an
    --out given by hand that holds something is still refused."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HORIZON_KERNELS", "torch")
    args = ["train", "--steps", "2", "--eval-every", "2", "--eval-problems", "4"]
    for _ in range(2):
        assert cli.main(args) == 0
        lines = (tmp_path / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines if '"train"' in line] == [1, 2]
    assert cli.main(args + ["--out", "runs/demo"]) == 2


def test_demo_rejects_finetune_options(capsys):
    assert cli.main(["train", "--data", "x.jsonl"]) == 2
    assert "--model" in capsys.readouterr().err


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    entry = dict(step=1, loss=2.5, tokens_per_s=1234.0, host_rss_peak_bytes=300 * 2**20, device_peak_bytes=2**20)
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        progress = cli.Progress(2, stream)
        progress.step(entry)
        progress.step(dict(entry, step=2))
        progress.note("eval")
        progress.close()
    bar = tty.getvalue()
    assert "2/2" in bar and "100%" in bar and "loss 2.5000  1,234 tok/s  rss 300 MiB  device peak 1 MiB" in bar
    assert "eval\n" in bar
    assert pipe.getvalue().splitlines() == ["step 1/2  loss 2.5000  1,234 tok/s  rss 300 MiB  device peak 1 MiB",
                                            "step 2/2  loss 2.5000  1,234 tok/s  rss 300 MiB  device peak 1 MiB",
                                            "eval"]


def test_plan_prints_the_table_from_a_config_alone(tmp_path, capsys):
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 4096, "hidden_size": 256,
              "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for model in (tmp_path, tmp_path / "config.json"):           # the directory or its config.json; no weights
        assert cli.main(["plan", "--model", str(model), "--tokens-per-step", "2048", "--gpu", "h200",
                         "--host-ram", "2GB"]) == 0
        out = capsys.readouterr().out
        assert "2,048 tokens a step (1 x 1 x 2048) on h200" in out and "device peak" in out and "bound by" in out
        layers = int(out.split("largest that fits: ")[1].split(" layers")[0])
        assert layers > 4                                        # a 2 GB host holds more of these layers
    assert cli.main(["plan", "--model", str(tmp_path), "--host-ram", "lots"]) == 2
    assert "cannot read 'lots' as a size" in capsys.readouterr().err


# ---- checkpoints and resuming --------------------------------------------------------------------------------
RUN = ("--steps", "8", "--batch-size", "2", "--seq-len", "24", "--grad-accum", "2", "--lr", "1e-3", "--warmup", "3",
       "--cosine")


def _weights(out):
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _train_lines(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_out_in_use_is_refused_and_overwrite_replaces_it(tmp_path, checkpoint, capsys):
    data = _jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    assert cli.main(_finetune_args(checkpoint, data, out, "--steps", "3", "--seq-len", "24", "--save-every", "1")) == 0
    earlier = (out / "model.safetensors").read_bytes()
    assert cli.main(_finetune_args(checkpoint, data, out, "--steps", "2", "--seq-len", "24")) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--resume" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == earlier
    assert cli.main(_finetune_args(checkpoint, data, out, "--steps", "2", "--seq-len", "24", "--overwrite")) == 0
    assert [line["step"] for line in _train_lines(out)] == [1, 2]
    assert (out / "generation_config.json").is_file() == (checkpoint / "generation_config.json").is_file()
    assert (out / "tokenizer.json").is_file() and not (out / "checkpoints").exists()


def test_save_every_keeps_the_newest_and_resume_refuses_other_options(tmp_path, checkpoint, capsys):
    data = _jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    assert cli.main(_finetune_args(checkpoint, data, out, *RUN, "--save-every", "3", "--keep-last", "2")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    changed = [a if a != "2" else "3" for a in RUN]           # --batch-size 3, --grad-accum 3
    assert cli.main(_finetune_args(checkpoint, data, out, *changed, "--resume")) == 2
    err = capsys.readouterr().err
    assert "--batch-size 3 (the checkpoint's run: 2)" in err and "--grad-accum 3" in err


@pytest.mark.slow
def test_sigint_and_sigterm_mid_run_then_resume_equal_an_uninterrupted_run(tmp_path, checkpoint):
    data = _jsonl(tmp_path / "train.jsonl", RECORDS)
    straight = tmp_path / "straight"
    assert cli.main(_finetune_args(checkpoint, data, straight, *RUN)) == 0
    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out = tmp_path / signal.Signals(signum).name
        args = _finetune_args(checkpoint, data, out, *RUN)
        proc = subprocess.Popen([sys.executable, "-m", "horizon_triton.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, HORIZON_KERNELS="torch"))
        for line in proc.stdout:
            if line.startswith("step 3/8"):
                proc.send_signal(signum)
                break
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == status, err
        assert "training state saved in" in err and "--resume" in err
        saved = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert len(saved) == 1 and 3 <= int(saved[0][5:]) < 8
        assert cli.main(args + ["--resume"]) == 0
        ours, theirs = _weights(out), _weights(straight)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert [(line["step"], line["loss"], line["grad_norm"]) for line in _train_lines(out)] == \
            [(line["step"], line["loss"], line["grad_norm"]) for line in _train_lines(straight)]
        assert (out / "tokenizer.json").is_file() and (out / "checkpoints" / saved[0]).is_dir()

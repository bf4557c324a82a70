"""Streaming data preparation: peak memory while a generated chat JSONL is read, tokenized with the chat template
by worker processes, packed and written to a row file (data.prepare), at growing file sizes; and its speed against
one apply_chat_template(tokenize=True) call a record on the same file, side by side in one run.

The memory must stay flat: the main process holds a few chunks of lines and one row, each worker one chunk. Each
size runs in a fresh child process, so that its peak RSS (ru_maxrss) is its own; the workers' peak is the largest
of theirs (RUSAGE_CHILDREN). Also reported: MB/s of JSONL and records/s (2 workers; the tokenizer is a word-level
one built here with a ChatML template, so the rate is that of the pipeline more than of a real BPE).

    pytest perf/test_data_prepare_perf.py --benchmark-only                  # 16 MiB and 64 MiB
    HORIZON_PREPARE_MIB=64,256,1024 pytest perf/test_data_prepare_perf.py --benchmark-only
    pytest perf/test_data_prepare_perf.py --benchmark-only -k speed         # HORIZON_PREPARE_SPEED_MIB=16

The speed test runs, each in a fresh process on the same file: the baseline (each line parsed, then one
apply_chat_template(tokenize=True) call: no spans, no labels, no packing), today's one-record algorithm
(encode.encode_record a line: every prefix rendered), the floor of any exact way (a chunk's records rendered in
one call, then the Rust tokenizer's batch with the character offsets the spans need, on one thread: no spans,
labels or packing), and data.prepare writing the row file with the tokenizer
limited to one thread, with its threads (workers=0), and with WORKERS processes. Recorded: wall-clock seconds,
records/s and the ratio to the baseline; and CPU seconds (user + system, the process's threads and its workers,
imports left out), the work done whatever else loads the machine, and their ratio to the baseline's.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SIZES_MIB = [int(s) for s in os.environ.get("HORIZON_PREPARE_MIB", "16,64").split(",")]
SPEED_MIB = int(os.environ.get("HORIZON_PREPARE_SPEED_MIB", "16"))
WORKERS = 2
SEQ_LEN = 2048
TESTS = Path(__file__).resolve().parent.parent / "tests"


def write_chat_jsonl(path: Path, mib: int) -> int:
    """Chat records of 1-3 exchanges with answers of 20-400 words, until the file has ``mib`` MiB; -> records."""
    sys.path.insert(0, str(TESTS))
    from tiny_tokenizers import WORDS
    import random
    rng = random.Random(0)
    words = [w for w in WORDS if w.isalpha()]
    target, size, records = mib * 2**20, 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < target:
            messages = []
            for _ in range(rng.randint(1, 3)):
                messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(5, 30))) + " ?"})
                messages.append({"role": "assistant",
                                 "content": " ".join(rng.choices(words, k=rng.randint(20, 400))) + " ."})
            line = json.dumps({"messages": messages}) + "\n"
            f.write(line)
            size += len(line)
            records += 1
    return records


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    from tiny_tokenizers import make_tokenizer
    from horizon_triton import data
    tokenizer = make_tokenizer(style="chatml")
    start = time.perf_counter()
    prepared = data.prepare(sys.argv[2], tokenizer, int(sys.argv[4]), 0, sys.argv[3], workers=int(sys.argv[5]),
                            too_long="truncate")
    seconds = time.perf_counter() - start
    stats = prepared.stats["train"]
    print(json.dumps(dict(seconds=seconds, records=stats.records, tokens=stats.tokens, rows=stats.rows,
                          main_peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          worker_peak_rss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)))
""")


@pytest.mark.parametrize("mib", SIZES_MIB)
def test_prepare_peak_rss(benchmark, record, tmp_path, mib):
    jsonl = tmp_path / "chat.jsonl"
    records = write_chat_jsonl(jsonl, mib)
    out = tmp_path / "rows"
    out.mkdir()
    result = {}

    def run():
        done = subprocess.run([sys.executable, "-c", CHILD, str(TESTS), str(jsonl), str(out), str(SEQ_LEN),
                               str(WORKERS)], capture_output=True, text=True, check=True)
        result.update(json.loads(done.stdout.splitlines()[-1]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    assert result["records"] == records
    record(jsonl_mib=mib, workers=WORKERS, seq_len=SEQ_LEN, records=records, tokens=result["tokens"],
           rows=result["rows"], seconds=round(result["seconds"], 1),
           jsonl_mb_per_s=round(jsonl.stat().st_size / result["seconds"] / 1e6, 2),
           records_per_s=round(records / result["seconds"]),
           main_peak_rss_MiB=round(result["main_peak_rss"] / 2**20), worker_peak_rss_MiB=round(
               result["worker_peak_rss"] / 2**20),
           row_file_MiB=round((out / "train.rows").stat().st_size / 2**20))
    jsonl.unlink()
    (out / "train.rows").unlink()


SPEED_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[1])
    from tiny_tokenizers import make_tokenizer
    from horizon_triton import data
    from horizon_triton.data.records import iter_lines, parse_line
    tokenizer = make_tokenizer(style="chatml")
    path, out, how = sys.argv[2], sys.argv[3], sys.argv[4]

    def cpu_seconds():      # this process's threads and its finished workers
        return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                             resource.RUSAGE_CHILDREN)))
    start, start_cpu = time.perf_counter(), cpu_seconds()
    tokens = 0
    if how == "floor":      # what any exact way pays: one rendering and the Rust tokenization with offsets
        lines = list(iter_lines(path))
        for at in range(0, len(lines), data.packing.CHUNK_LINES):
            texts = tokenizer.apply_chat_template([parse_line(raw, path, first=number == 1)["messages"]
                                                   for number, raw in lines[at:at + data.packing.CHUNK_LINES]],
                                                  tokenize=False)
            tokens += sum(len(e) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False))
    elif how in ("baseline", "encode_record"):
        for number, raw in iter_lines(path):
            record = parse_line(raw, path, first=number == 1)
            if how == "baseline":
                tokens += len(tokenizer.apply_chat_template(record["messages"], tokenize=True,
                                                            return_dict=True)["input_ids"])
            else:
                tokens += len(data.encode_record(record, tokenizer)[0])
    else:
        prepared = data.prepare(path, tokenizer, 2048, 0, out, workers=int(how), too_long="truncate")
        tokens = prepared.stats["train"].tokens
        assert prepared.stats["train"].slow_path == 0
    print(json.dumps(dict(seconds=time.perf_counter() - start, cpu_seconds=cpu_seconds() - start_cpu, tokens=tokens)))
""")


def test_prepare_speed_against_one_template_call_per_record(benchmark, record, tmp_path):
    jsonl = tmp_path / "chat.jsonl"
    records = write_chat_jsonl(jsonl, SPEED_MIB)
    out = tmp_path / "rows"
    out.mkdir()
    runs = {"baseline": ("baseline", {}), "encode_record": ("encode_record", {}),
            "floor_1_thread": ("floor", {"RAYON_NUM_THREADS": "1"}),
            "prepare_1_thread": ("0", {"RAYON_NUM_THREADS": "1"}), "prepare_threads": ("0", {}),
            f"prepare_{WORKERS}_workers": (str(WORKERS), {})}
    result = {}

    def run():
        for name, (how, env) in runs.items():
            done = subprocess.run([sys.executable, "-c", SPEED_CHILD, str(TESTS), str(jsonl), str(out), how],
                                  capture_output=True, text=True, check=True, env={**os.environ, **env})
            result[name] = json.loads(done.stdout.splitlines()[-1])

    benchmark.pedantic(run, rounds=1, iterations=1)
    # the same tokens: the baseline's count is the template's own tokenization of every record
    assert len({r["tokens"] for r in result.values()}) == 1, result
    base = result["baseline"]["seconds"]
    record(jsonl_mib=SPEED_MIB, records=records, tokens=result["baseline"]["tokens"], cpus=os.cpu_count(),
           **{f"{name}_s": round(r["seconds"], 2) for name, r in result.items()},
           **{f"{name}_records_per_s": round(records / r["seconds"]) for name, r in result.items()},
           **{f"{name}_vs_baseline": round(base / r["seconds"], 2) for name, r in result.items()},
           **{f"{name}_cpu_s": round(r["cpu_seconds"], 2) for name, r in result.items()},
           **{f"{name}_cpu_vs_baseline": round(result["baseline"]["cpu_seconds"] / r["cpu_seconds"], 2)
              for name, r in result.items()})

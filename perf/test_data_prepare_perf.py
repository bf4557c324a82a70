"""Streaming data preparation: peak memory while a generated chat JSONL is read, tokenized with the chat template
by worker processes, packed and written to a row file (data.prepare), at growing file sizes.

The memory must stay flat: the main process holds a few chunks of lines and one row, each worker one chunk. Each
size runs in a fresh child process, so that its peak RSS (ru_maxrss) is its own; the workers' peak is the largest
of theirs (RUSAGE_CHILDREN). Also reported: MB/s of JSONL and records/s (2 workers; the tokenizer is a word-level
one built here with a ChatML template, so the rate is that of the pipeline more than of a real BPE).

    pytest perf/test_data_prepare_perf.py --benchmark-only                  # 16 MiB and 64 MiB
    HORIZON_PREPARE_MIB=64,256,1024 pytest perf/test_data_prepare_perf.py --benchmark-only
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SIZES_MIB = [int(s) for s in os.environ.get("HORIZON_PREPARE_MIB", "16,64").split(",")]
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

"""Data parallel on CPU (gloo): W ranks with grad_accum micro-batches each against one process with
grad_accum × W (the reference: the engine alone, itself checked against transformers in test_engine_hf.py);
the async test device bit-identical to the synchronous one; faults; torchrun end to end.

Tolerances: in fp32 compute the only difference is the order of the fp32 sums (each rank accumulates its own
micro-batches, then the ranks' sums are added), a few ulp of the gradient: losses and norms within 1e-5
relative, master weights within 1e-5. In bf16 compute each rank's micro-batches run the same bf16 GEMMs as in
the single process, but the reduced fp32 gradient, rounded to the bf16 grad buffer, can land one bf16 ulp
(2^-8 relative) apart where the sum order moves it across a rounding boundary; AdamW's normalized update then
moves such an element by up to ~lr·2^-8 more or less: weights within 1e-4 at lr 1e-3 over two steps, losses
(computed before the step's update) within 1e-5 of each other in the first step, 1e-4 after.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import horizon_triton as ht
from horizon_triton.devices import distributed
from horizon_triton.devices.distributed import ShardedLoader
from horizon_triton.objectives import preference

import distributed_worker as worker

TESTS = Path(__file__).parent


def run_ranks(tmp_path, spec: dict, world: int = 2) -> list[dict]:
    out = tmp_path / f"w{world}-{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    distributed.spawn(worker.run_rank, world, (str(out), spec))
    return [dict(torch.load(out / f"rank{r}.pt"), out=out) for r in range(world)]


def one_process(spec: dict, world: int, engine_too: bool = False):
    """The same run in one process: every rank's micro-batches of a step accumulated there. (history, masters),
    and if asked the engine and its micro-batches."""
    model_cfg, train_cfg = worker.configs(spec)
    train_cfg = dataclasses.replace(train_cfg, grad_accum_steps=train_cfg.grad_accum_steps * world)
    engine = ht.Engine(model_cfg, train_cfg)
    data = worker.training_batches(engine, spec)
    history = engine.fit(data, max_steps=spec.get("steps"))
    return (history, worker.masters(engine)) + ((engine, data) if engine_too else ())


def assert_matches(spec, ranks, world, loss_tol, weight_tol, norm_tol, metrics=(), alone=None):
    """Every rank reports the same figures and holds the same weights; they are one process's (``alone``: its
    (history, masters) if already run; ``metrics``: more history keys compared as the loss is, within loss_tol
    relative or 1e-6 absolute)."""
    history, masters = alone or one_process(spec, world)
    for r in ranks:        # every rank reports the global figures and holds the same weights, bit for bit
        assert [h["loss"] for h in r["history"]] == [h["loss"] for h in ranks[0]["history"]]
        assert all(torch.equal(a, b) for a, b in zip(r["masters"], ranks[0]["masters"]))
    got = ranks[0]["history"]
    assert len(got) == len(history)
    for mine, ref in zip(got, history):
        assert mine["tokens"] == ref["tokens"]
        assert mine["world_size"] == world
        assert abs(mine["loss"] - ref["loss"]) <= loss_tol * abs(ref["loss"])
        assert abs(mine["grad_norm"] - ref["grad_norm"]) <= norm_tol * ref["grad_norm"]
        for key in metrics:
            assert mine[key] == pytest.approx(ref[key], rel=loss_tol, abs=1e-6), key
    for a, b in zip(ranks[0]["masters"], masters):
        torch.testing.assert_close(a, b, rtol=0, atol=weight_tol)
    # clipping was active (max_grad_norm 0.5): the norm of the reduced gradient decided the update
    max_norm = worker.configs(spec)[1].max_grad_norm
    assert all(h["grad_norm"] > max_norm for h in history)


FP32 = {"compute_dtype": "float32", "grad_accum_steps": 2}


@pytest.mark.parametrize("case", [
    # hidden 36: 64 x 36 = 9 blocks of 256, the 2 shards cut the embedding inside row 28
    {"model": {"hidden_size": 36}, "train": dict(FP32, head_chunk_rows=24)},               # two-pass head
    {"model": {"hidden_size": 36, "tie_word_embeddings": True, "pad_token_id": 0}, "train": FP32,
     "pad_id": 0},                                                                         # tied, padding
    {"model": {"tie_word_embeddings": True}, "train": dict(FP32, head_chunk_rows=24, share_host_store=False)},
], ids=["untied-chunked", "tied-padded", "private-stores"])
def test_two_ranks_match_one_process_fp32(tmp_path, case):
    """Shared (the default: one store for the node, each rank streams out and updates its shard) or private
    stores (each rank its whole store, the whole reduced gradient, the whole AdamW)."""
    spec = {"model": case["model"], "train": case["train"],
            "batches": {"n": 8, "seed": 3, "pad_id": case.get("pad_id")}}
    ranks = run_ranks(tmp_path, spec)
    assert_matches(spec, ranks, 2, loss_tol=1e-5, weight_tol=1e-5, norm_tol=1e-5)
    assert ranks[0]["history"][0]["allreduce_bytes"] > 0


def test_four_ranks_on_two_nodes(tmp_path):
    """Two nodes of two ranks (torchrun's node and local ranks): each rank knows its place, the node groups and
    the cross-node groups are made, and the numbers are still one process's."""
    spec = {"train": dict(FP32, grad_accum_steps=1), "batches": {"n": 8, "seed": 10}}
    out = tmp_path / "nodes"
    out.mkdir()
    distributed.spawn(worker.run_rank_on_nodes, 4, (str(out), spec, 2))
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(4)]
    assert [r["place"] for r in ranks] == [{"node": r // 2, "num_nodes": 2, "local_rank": r % 2, "local_world": 2}
                                           for r in range(4)]
    assert_matches(spec, ranks, 4, loss_tol=1e-5, weight_tol=1e-5, norm_tol=1e-5)


@pytest.mark.parametrize("per_node,node_cuts", [(2, [0, 3, 10]), (2, [0, 5, 10]), (1, None)],
                         ids=["one-node", "one-node-even", "two-nodes"])
def test_sharded_reduction_sums_each_shard(tmp_path, per_node, node_cuts):
    """reduce_gradient with shards (the CUDA path's reduce-scatter in the node, then the cross-node all-reduce),
    run on gloo: every rank's shard holds the sum over the 2 ranks (two nodes of one rank: the cross step)."""
    distributed.spawn(worker.reduce_shards, 2, (str(tmp_path), per_node, node_cuts))
    total = torch.arange(10, dtype=torch.float32) * 3
    cuts = node_cuts if per_node == 2 else [0, 10, 10]
    for rank in range(2):
        local = rank % per_node
        torch.testing.assert_close(torch.load(tmp_path / f"shard{rank}.pt"), total[cuts[local]:cuts[local + 1]])


@pytest.mark.parametrize("cuts", [[0, 5, 10], [0, 3, 10]], ids=["even", "uneven"])
def test_sharded_reduction_copies_no_accumulator(monkeypatch, cuts):
    """The node step reduces the accumulator where it lies: equal shards in order are one reduce-scatter of the
    whole tensor, uneven ones one reduce per shard onto its owner; never a reduce-scatter of a list of tensors,
    which copies every input into a flat buffer first. (The sums themselves: test_sharded_reduction_sums_each_shard
    on gloo.)"""
    calls = []

    class Work:
        def wait(self):
            calls.append(("wait",))

    def record(name):
        return lambda *args, **kwargs: calls.append((name, args, kwargs)) or Work()
    monkeypatch.setattr(distributed.dist, "reduce_scatter", record("reduce_scatter"))
    monkeypatch.setattr(distributed, "_REDUCE_SCATTER_ONE_TENSOR", record("reduce_scatter_one_tensor"))
    monkeypatch.setattr(distributed.dist, "reduce", record("reduce"))
    monkeypatch.setattr(distributed.dist, "get_global_rank", lambda group, rank: 10 + rank)
    ctx = distributed.DistContext(rank=11, world=2, local_rank=1, local_world=2, node=0, num_nodes=1,
                                  backend="nccl", group="all", control="gloo", node_group="node", cross_group=None,
                                  node_of=[0, 0])
    acc = torch.zeros(10)
    shards = [acc[a:b] for a, b in zip(cuts, cuts[1:])]
    ctx.reduce_gradient(acc, asynchronous=True, shards=shards).wait()
    names = [c[0] for c in calls if c[0] != "wait"]
    if cuts == [0, 5, 10]:
        assert names == ["reduce_scatter_one_tensor"]
        out, whole = calls[0][1]
        assert out.data_ptr() == shards[1].data_ptr() and whole.data_ptr() == acc.data_ptr()
        assert whole.numel() == 10 and calls[0][2]["group"] == "node"
    else:
        assert names == ["reduce", "reduce"]
        for owner, (_, args, kwargs) in enumerate(calls[:2]):
            assert args[0].data_ptr() == shards[owner].data_ptr() and args[0].numel() == shards[owner].numel()
            assert kwargs["dst"] == 10 + owner and kwargs["group"] == "node"
        assert calls[2:] == [("wait",), ("wait",)]


def test_two_ranks_match_one_process_bf16(tmp_path):
    spec = {"train": {"grad_accum_steps": 2}, "batches": {"n": 8, "seed": 5}}
    ranks = run_ranks(tmp_path, spec)
    assert_matches(spec, ranks, 2, loss_tol=1e-4, weight_tol=1e-4, norm_tol=1e-4)
    history, _ = one_process(spec, 2)
    assert abs(ranks[0]["history"][0]["loss"] - history[0]["loss"]) <= 1e-5 * history[0]["loss"]


LORA = {"lora_rank": 4, "lora_alpha": 8, "lora_targets": ["q_proj", "v_proj", "down_proj"]}
DPO = {"objective": "dpo", "dpo_beta": 0.5}
# 8 micro-batches of one pair each; the reference pass in batches of 3 pairs: 3 batches over 2 ranks (uneven)
PAIRS = {"n": 8, "seed": 4, "per_batch": 1, "reference_batch": 3}


@pytest.mark.parametrize("case", [
    pytest.param({"train": dict(FP32, **LORA, max_grad_norm=0.05)}, id="lora-shared"),   # a shard of adapters each
    pytest.param({"train": dict(FP32, **LORA, max_grad_norm=0.05, share_host_store=False, head_chunk_rows=24),
                  "model": {"tie_word_embeddings": True}}, id="lora-private-tied-chunked", marks=pytest.mark.slow),
    pytest.param({"train": dict(FP32, **DPO)}, id="dpo", marks=pytest.mark.slow),        # a full fine-tune, shared
    pytest.param({"train": dict(FP32, **DPO, **LORA, max_grad_norm=0.05, head_chunk_rows=24)}, id="dpo-on-lora"),
])
def test_lora_and_dpo_two_ranks_match_one_process(tmp_path, case):
    """LoRA (the adapters' gradients reduced, the frozen base not) and DPO (the pairs counted over every rank, the
    reference pass shared out, the metrics summed) on 2 ranks: one process with grad-accum 2, losses, TRL's
    metrics, gradient norms, trained weights (the adapters of a LoRA run) and the saved adapters."""
    dpo = case["train"].get("objective") == "dpo"
    spec = {"model": case.get("model", {}), "train": case["train"], "save": "lora_rank" in case["train"],
            **({"pairs": PAIRS} if dpo else {"batches": {"n": 8, "seed": 13}})}
    ranks = run_ranks(tmp_path, spec)
    history, masters, engine, data = one_process(spec, 2, engine_too=True)
    assert_matches(spec, ranks, 2, loss_tol=1e-5, weight_tol=1e-5, norm_tol=1e-5,
                   metrics=("pairs",) + preference.METRICS if dpo else (), alone=(history, masters))
    if engine.store.lora is not None:    # the adapters' fp32 gradients alone cross between the ranks
        adapters = sum(layout.numel for layout in engine.store.adapter_layouts)
        assert all(h["allreduce_bytes"] == 4 * adapters for h in ranks[0]["history"])
    else:
        assert ranks[0]["history"][0]["allreduce_bytes"] > 0
    if dpo:                   # every rank holds every row's reference, computed on one of them
        reference = torch.stack([b["ref_logps"] for b in data])
        for r in ranks:
            torch.testing.assert_close(r["reference"], reference, rtol=0, atol=1e-6)
        assert ranks[0]["history"][0]["pairs"] == 4 and ranks[0]["history"][1]["rewards/margins"] != 0
    if spec["save"]:          # rank 0 wrote the adapters (peft's format) of the trained run
        engine.optimizer.wait_all()
        saved = load_file(ranks[0]["out"] / "model" / "adapter_model.safetensors")
        for layer, layout in enumerate(engine.store.adapter_layouts):
            for p in layout.params:
                want = engine.store.master_values(layer, p.offset, p.offset + p.numel, adapters=True)
                torch.testing.assert_close(saved[p.hf_name].reshape(-1), want, rtol=0, atol=1e-5)
    engine.close()


def test_async_device_is_bit_identical(tmp_path):
    """The async test device (streams on threads, random delays) under 2 ranks: the very same bits as cpu."""
    spec = {"model": {"tie_word_embeddings": True}, "train": dict(FP32, head_chunk_rows=24),
            "batches": {"n": 8, "seed": 6}}
    sync = run_ranks(tmp_path, spec)
    spec_async = dict(spec, train=dict(spec["train"], device="cpu-async"))
    racy = run_ranks(tmp_path, spec_async)
    assert [h["loss"] for h in racy[0]["history"]] == [h["loss"] for h in sync[0]["history"]]
    assert [h["grad_norm"] for h in racy[0]["history"]] == [h["grad_norm"] for h in sync[0]["history"]]
    assert all(torch.equal(a, b) for a, b in zip(racy[0]["masters"], sync[0]["masters"]))


def test_only_rank_0_writes(tmp_path):
    """save_pretrained and save_checkpoint on every rank: rank 0 writes (each rank here names its own directory,
    to see who wrote), and the saved model is the single process's."""
    spec = {"train": FP32, "batches": {"n": 4, "seed": 7}, "save": True}
    out = tmp_path / "run"
    out.mkdir()
    distributed.spawn(_save_per_rank_dir, 2, (str(out), spec))
    assert (out / "r0" / "model" / "config.json").is_file()
    assert list((out / "r0" / "checkpoints").iterdir())[0].name == "step-00000001"
    assert not (out / "r1").exists()
    _, masters = one_process(spec, 2)
    saved = load_file(out / "r0" / "model" / "model.safetensors")
    torch.testing.assert_close(saved["model.embed_tokens.weight"].reshape(-1), masters[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("train", [pytest.param({}, id="full"),
                                   pytest.param(LORA, id="lora", marks=pytest.mark.slow)])
def test_a_checkpointed_job_resumes_bit_identically(tmp_path, train):
    """Two ranks on a shared store: 2 steps, a training checkpoint, then a new job resumes from it for 2 more
    steps; the same losses and weights (a LoRA run's adapters), bit for bit, as 4 steps at once."""
    spec = {"train": {"grad_accum_steps": 1, **train}, "batches": {"n": 8, "seed": 11}}
    whole = run_ranks(tmp_path, dict(spec, steps=4))
    run_ranks(tmp_path, dict(spec, steps=2, checkpoint_to=str(tmp_path / "ckpt")))
    resumed = run_ranks(tmp_path, dict(spec, steps=2, resume=str(tmp_path / "ckpt")))
    assert [h["step"] for h in resumed[0]["history"]] == [3, 4]
    assert [h["loss"] for h in resumed[0]["history"]] == [h["loss"] for h in whole[0]["history"][2:]]
    assert all(torch.equal(a, b) for a, b in zip(resumed[0]["masters"], whole[0]["masters"]))


def _save_per_rank_dir(rank: int, out: str, spec: dict) -> None:
    model_cfg, train_cfg = worker.configs(spec)
    engine = ht.Engine(model_cfg, train_cfg)
    engine.fit(worker.batches(**spec["batches"])[rank::2])
    engine.save_pretrained(Path(out) / f"r{rank}" / "model")
    engine.save_checkpoint(Path(out) / f"r{rank}" / "checkpoints")


# ------------------------------------------------------------------------------------------------------------
# faults: two independent processes (no launcher that would kill the survivor), each must exit on its own
# ------------------------------------------------------------------------------------------------------------
def launch_apart(tmp_path, spec: dict, world: int = 2, timeout: float = 90):
    """Starts the ranks as unrelated processes; returns (exit codes, each rank's error text, seconds)."""
    port = distributed.free_port()
    procs = []
    start = time.monotonic()
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(TESTS / "distributed_worker.py"), str(tmp_path),
                                       json.dumps(spec)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    codes = []
    for p in procs:
        try:
            p.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung: the job did not end within the time bound")
        codes.append(p.returncode)
    errors = [(tmp_path / f"error{r}.txt").read_text() if (tmp_path / f"error{r}.txt").is_file() else ""
              for r in range(world)]
    for p in procs:
        p.stderr.close()
    return codes, errors, time.monotonic() - start


@pytest.mark.parametrize("how, expected", [
    ("data", "token id 71 is outside the vocabulary"),
    ("raise", "a bug on rank 1 at step 2"),
])
def test_a_failing_rank_ends_every_rank_with_its_error(tmp_path, how, expected):
    spec = {"train": FP32, "batches": {"n": 12, "seed": 8}, "fail": {"rank": 1, "step": 2, "how": how}}
    codes, errors, seconds = launch_apart(tmp_path, spec)
    assert all(code != 0 for code in codes), codes
    assert expected in errors[1]
    assert errors[0].startswith("RankFailed") and "rank 1" in errors[0] and expected in errors[0], errors[0]
    assert seconds < 60


def test_a_killed_rank_ends_every_rank(tmp_path):
    """Rank 1 is killed (SIGKILL, as by the OOM killer) after step 2: it reports nothing; rank 0, waiting for it
    in a collective or for its shard of the update, stops on its own, saying which rank or that a peer vanished."""
    spec = {"train": FP32, "batches": {"n": 12, "seed": 8}, "fail": {"rank": 1, "step": 2, "how": "kill"}}
    codes, errors, seconds = launch_apart(tmp_path, spec)
    assert codes[1] == -9 and codes[0] != 0
    assert "rank 1" in errors[0] or "vanished" in errors[0], errors[0]
    assert seconds < 60


@pytest.mark.parametrize("rank, calls, expected", [
    (0, ["evaluate"], "evaluate must be called on every rank of the data-parallel job (each rank with its own "
                      "batches"),
    (1, ["save_pretrained"], "save_pretrained: rank 0 writes"),
])
def test_calls_made_on_one_rank_alone_are_refused_saying_how(tmp_path, rank, calls, expected):
    """The ``if rank == R:`` idiom after fit, the other rank ending there, with a call that cannot be made so:
    evaluate (every rank's batches are summed) on rank 0 alone, a save (rank 0 writes) on rank 1 alone. The
    rank that made it stops at once, saying how to call it, not that a peer vanished; the other exits 0."""
    spec = {"train": FP32, "batches": {"n": 4, "seed": 9}, "only_rank": {"rank": rank, "calls": calls}}
    codes, errors, seconds = launch_apart(tmp_path, spec)
    assert codes[1 - rank] == 0 and codes[rank] != 0, (codes, errors)
    assert errors[rank].startswith("RankFailed") and expected in errors[rank], errors[rank]
    if rank == 0:
        assert "rank 1 after fit" in errors[0], errors[0]
    else:
        assert "exited without writing them (save_pretrained #1 at step 1; call save_pretrained on rank 0, alone or on " \
               "every rank)" in errors[1], errors[1]
    assert seconds < 60


def test_mismatched_configs_are_refused_naming_field_and_ranks(tmp_path):
    spec = {"train": FP32, "batches": {"n": 4, "seed": 9}, "rank_train": {"1": {"lr": 0.5}}}
    codes, errors, _ = launch_apart(tmp_path, spec)
    assert all(code != 0 for code in codes)
    for text in errors:
        assert "the train config differs" in text and "lr is 0.001 on ranks 0; 0.5 on ranks 1" in text, text


def test_mismatched_loader_lengths_are_refused(tmp_path):
    spec = {"train": FP32, "batches": {"n": 12, "seed": 9}, "per_rank_counts": {"0": 6, "1": 4}}
    codes, errors, _ = launch_apart(tmp_path, spec)
    assert all(code != 0 for code in codes)
    for text in errors:
        assert "the loader differs" in text and "6 on ranks 0; 4 on ranks 1" in text, text


def test_a_shorter_loader_without_length_is_caught_at_its_step(tmp_path):
    spec = {"train": FP32, "batches": {"n": 12, "seed": 9}, "per_rank_counts": {"0": 6, "1": 3},
            "no_len": True}
    codes, errors, _ = launch_apart(tmp_path, spec)
    assert all(code != 0 for code in codes)
    for text in errors:
        assert "optimizer step 2: the data-parallel ranks bring different numbers of micro-batches: 1 on ranks " \
               "1; 2 on ranks 0" in text, text


def test_sharded_loader_deals_batches_out():
    loader = list(range(11))
    shards = [ShardedLoader(loader, r, 3) for r in range(3)]
    assert [list(s) for s in shards] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert list(ShardedLoader(loader, 1, 3, drop_remainder=False)) == [1, 4, 7, 10]


# ------------------------------------------------------------------------------------------------------------
# torchrun
# ------------------------------------------------------------------------------------------------------------
def _torchrun_and_alone(tmp_path, common: list[str], timeout: int) -> subprocess.CompletedProcess:
    """The CLI with ``common`` under torchrun on 2 ranks into tmp_path/dp, and alone with --grad-accum 2 into
    tmp_path/one."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          "-m", "horizon_triton.cli", *common, "--out", str(tmp_path / "dp")],
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    alone = subprocess.run([sys.executable, "-m", "horizon_triton.cli", *common, "--grad-accum", "2", "--out",
                            str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=timeout)
    assert alone.returncode == 0, alone.stderr[-3000:]
    return run


def test_cli_demo_under_torchrun_matches_one_process(tmp_path):
    """torchrun --nproc-per-node 2 -m horizon_triton.cli train: each rank every other micro-batch of the demo's
    generated data; rank 0 writes metrics.jsonl and the model; the figures are those of one process with
    --grad-accum 2."""
    common = ["train", "--steps", "3", "--eval-every", "100", "--eval-problems", "8", "--batch-size", "8"]
    run = _torchrun_and_alone(tmp_path, common, timeout=240)

    def train_lines(run_dir):
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [x for x in lines if x["kind"] == "train"]
    dp, one = train_lines(tmp_path / "dp"), train_lines(tmp_path / "one")
    assert [x["step"] for x in dp] == [1, 2, 3]                 # written once, by rank 0
    for a, b in zip(dp, one):
        assert a["tokens"] == b["tokens"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"]
    assert (tmp_path / "dp" / "model.safetensors").is_file()
    assert run.stdout.count("step 3/3") == 1                    # rank 0 reports


@pytest.mark.slow
def test_cli_failure_under_torchrun_reports_the_rank(tmp_path):
    """An --out that holds another run: rank 0 refuses it; rank 1, waiting for rank 0, stops with its message."""
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("someone else's")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          "-m", "horizon_triton.cli", "train", "--steps", "2", "--out", str(out)],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert run.returncode != 0
    assert "exists and is not empty" in run.stderr
    assert (out / "notes.txt").is_file()


@pytest.mark.slow
def test_cli_dpo_on_lora_under_torchrun_matches_one_process(tmp_path):
    """--objective dpo --lora-rank 4 under torchrun: the reference pass shared out over the ranks (5 rows, a batch
    each: 3 rounds), each rank every other batch, the held-out pairs split between the ranks; the train and eval
    lines (TRL's metrics), the reference file and the saved adapters are one process's with --grad-accum 2."""
    import numpy as np
    from hf_reference import make_hf_model
    from test_dpo import _conversational
    from tiny_tokenizers import make_tokenizer
    src = tmp_path / "src"
    tokenizer = make_tokenizer(src, style="chatml")
    make_hf_model("llama", src, vocab_size=len(tokenizer), max_position_embeddings=256)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in _conversational()))
    common = ["train", "--model", str(src), "--data", str(prefs), "--device", "cpu", "--dtype", "float32",
              "--objective", "dpo", "--dpo-beta", "0.5", "--seq-len", "64", "--batch-size", "1", "--steps", "2",
              "--eval-split", "0.25", "--lr", "2e-3", "--lora-rank", "4", "--lora-targets", "q_proj,down_proj"]
    _torchrun_and_alone(tmp_path, common, timeout=300)

    def lines(run_dir, kind):
        return [x for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if x["kind"] == kind]
    for kind, keys in (("train", ("loss", "pairs", "grad_norm") + preference.METRICS),
                       ("eval", ("eval_loss", "eval_pairs") + tuple(f"eval_{k}" for k in preference.METRICS))):
        dp, one = lines(tmp_path / "dp", kind), lines(tmp_path / "one", kind)
        assert len(dp) == len(one) > 0
        for a, b in zip(dp, one):
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (kind, key)
    assert lines(tmp_path / "dp", "train")[-1]["rewards/margins"] != 0
    refs = [np.fromfile(tmp_path / run / "reference" / "train.ref", dtype=np.float32) for run in ("dp", "one")]
    np.testing.assert_allclose(refs[0], refs[1], rtol=0, atol=1e-6)
    got = load_file(tmp_path / "dp" / "adapter_model.safetensors")
    ref = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert set(got) == set(ref)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# the dry run of one rank of W
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 8])
def test_dry_run_predicts_one_ranks_traffic(world):
    """One rank of a W-rank job, bf16, tied head in chunks: it all-reduces every fp32 gradient it streams out
    (the decoder layers, each head chunk's rows, the final norm, the union's embedding rows) and gathers the
    union of the ranks' ids, min(V, W·U) rows with distinct ids on every rank, in and out, where one process
    gathers U (with their ids: the tied head picks those rows from its chunks' gradients)."""
    from horizon_triton.planning.dryrun import dry_run
    from horizon_triton.models.dense.weights import layer_layouts
    cfg = ht.ModelConfig(vocab_size=3000, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                         num_kv_heads=2, tie_word_embeddings=True)
    train = ht.TrainConfig(head_chunk_rows=700)
    alone = dry_run(cfg, train, tokens_per_step=512, world_size=1)
    rank = dry_run(cfg, train, tokens_per_step=512, world_size=world)
    H, V, U = cfg.hidden_size, cfg.vocab_size, 512
    union = min(V, world * U)
    decoders_and_norm = sum(lay.numel for lay in layer_layouts(cfg)[1:])
    assert alone.allreduce_bytes == 0
    assert rank.allreduce_bytes == 4 * (decoders_and_norm + V * H + union * H)    # chunks: the whole table
    assert rank.h2d_bytes - alone.h2d_bytes == (union - U) * (H * 2 + 8)    # bf16 rows, their int64 ids (tied)
    assert rank.d2h_bytes - alone.d2h_bytes == (union - U) * H * 2                 # and their gradient out


def test_resuming_with_another_number_of_ranks_is_refused(tmp_path, monkeypatch, capsys):
    """The data order depends on the ranks (each takes every W-th batch): a run saved by one process does not
    resume on two."""
    from contextlib import nullcontext
    from types import SimpleNamespace
    from horizon_triton import cli
    out = tmp_path / "run"
    demo = ["train", "--steps", "2", "--save-every", "1", "--eval-every", "100", "--eval-problems", "4",
            "--batch-size", "4", "--out", str(out)]
    assert cli.main(demo) == 0
    two_ranks = SimpleNamespace(world=2, rank=0, guard=nullcontext)
    monkeypatch.setattr(distributed, "context", lambda device_type="cpu": two_ranks)
    assert cli.main(demo + ["--resume"]) == 2
    assert "data-parallel ranks 2 (the checkpoint's run: 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_python_api_under_torchrun(tmp_path):
    """A user's script under torchrun: Engine finds the job in torchrun's environment (tests/distributed_worker.py
    run as the script), and the numbers are one process's."""
    spec = {"train": FP32, "batches": {"n": 8, "seed": 12}}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          str(TESTS / "distributed_worker.py"), str(tmp_path), json.dumps(spec)],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert_matches(spec, ranks, 2, loss_tol=1e-5, weight_tol=1e-5, norm_tol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("share", [True, False])
def test_saving_on_rank_0_alone_under_torchrun(tmp_path, share):
    """The usual DDP idiom: ``if rank == 0: engine.save_pretrained(out); engine.save_checkpoint(dir)`` after fit,
    rank 1 ending its script there. Rank 0 saves alone (from the node-shared store, or its own replica): the
    model is the single process's, and the checkpoint resumes it, alone."""
    spec = {"train": {**FP32, "share_host_store": share}, "batches": {"n": 8, "seed": 12},
            "only_rank": {"rank": 0, "calls": ["save_pretrained", "save_checkpoint"]}}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          str(TESTS / "distributed_worker.py"), str(tmp_path), json.dumps(spec)],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    _, masters = one_process(spec, 2)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "model" / "model.safetensors")
    torch.testing.assert_close(saved["model.embed_tokens.weight"].reshape(-1), masters[0], rtol=0, atol=1e-5)
    resumed = ht.Engine.from_checkpoint(tmp_path / "checkpoints")
    assert resumed.step == 2
    assert all(torch.equal(a, b) for a, b in zip(worker.masters(resumed), torch.load(tmp_path / "rank0.pt")["masters"]))
    resumed.close()


@pytest.mark.slow
def test_cli_finetune_under_torchrun_matches_one_process(tmp_path):
    """The fine-tune under torchrun: every rank tokenizes the file, takes every other batch of one loader; the
    eval loss over both ranks' eval batches; the losses and the saved weights are one process's with
    --grad-accum 2."""
    from hf_reference import make_hf_model
    from tiny_tokenizers import make_tokenizer
    src = tmp_path / "src"
    make_hf_model("llama", src)
    make_tokenizer(src)
    records = [{"text": "the cat sat on the mat ."}, {"prompt": "what did the dog do ?",
                                                      "response": "the dog ran under the rug ."},
               {"text": "a big red dog sat on a small blue rug ."}, {"prompt": "did the cat sit ?",
                                                                     "response": "yes ."}] * 3
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["train", "--model", str(src), "--data", str(data), "--device", "cpu", "--dtype", "float32",
              "--steps", "3", "--batch-size", "2", "--seq-len", "24", "--eval-split", "0.25", "--lr", "1e-3"]
    _torchrun_and_alone(tmp_path, common, timeout=300)

    def lines(run_dir, kind):
        return [x for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if x["kind"] == kind]
    for a, b in zip(lines(tmp_path / "dp", "train"), lines(tmp_path / "one", "train"), strict=True):
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) <= 1e-5 * b["loss"]
    (dp_eval,), (one_eval,) = lines(tmp_path / "dp", "eval"), lines(tmp_path / "one", "eval")
    assert abs(dp_eval["eval_loss"] - one_eval["eval_loss"]) <= 1e-5 * one_eval["eval_loss"]
    got, ref = load_file(tmp_path / "dp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5)

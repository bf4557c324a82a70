"""One host store per node (node_store.py): 2 and 3 spawned processes map one store; the sharded AdamW equals
the single-process update bit for bit; a failed, hung or killed peer ends the waits with an error naming it;
nothing is left in /dev/shm; checkpoints of a shared store; the pinning of a shared store in each process;
the machine's memory with 2 processes is about one store's."""
import os
import signal

import pytest
import torch

import node_store_worker as worker
import horizon_triton as ht
from horizon_triton.kernels.host_formats import QBLOCK
from horizon_triton.host.node_store import SHM_DIR, NodeShare
from horizon_triton.host.optimizer import OptimizerDriver, optimizer_threads
from horizon_triton.host.store import HostStore
from horizon_triton.objectives.lora import LoraSpec

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason=f"needs POSIX shared memory at {SHM_DIR}")
Ranks = worker.Ranks


def _leftovers(name: str) -> list[str]:
    return sorted(f for f in os.listdir(SHM_DIR) if name in f)


# ---- shard bounds (no processes) ------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_shard_bounds_cover_each_layer_disjointly_on_block_boundaries(world, lora):
    """Of a LoRA store, the shards are of each layer's adapters (what its ranks' AdamW updates)."""
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")) if lora else None
    store = HostStore(worker.CFG, torch.bfloat16, device="meta", lora=spec)
    for i, layout in enumerate(store.adapter_layouts if lora else store.layouts):
        bounds = [store.shard_bounds(i, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == layout.numel
        for (lo, hi), (next_lo, _) in zip(bounds, bounds[1:]):
            assert lo <= hi == next_lo                                    # consecutive: disjoint and covering
        assert all(lo % QBLOCK == 0 for lo, _ in bounds)
        assert all(hi % QBLOCK == 0 for _, hi in bounds[:-1])
        blocks = [-(-(hi - lo) // QBLOCK) for lo, hi in bounds]
        assert max(blocks) - min(blocks) <= 1                             # balanced to one block
    with pytest.raises(ValueError, match=r"local_rank 2 is not in \[0, 2\)"):
        store.shard_bounds(0, 2, 2)


def test_cuts_fall_in_the_decayed_prefix_and_in_the_rest():
    """The test model's layers are cut where the tests need: inside the decayed matrices, inside the norms (the
    tied head), with an empty shard at 3 ranks and a decayed prefix ending inside a block."""
    store = HostStore(worker.CFG, torch.bfloat16, device="meta")
    layer, head = store.layouts[1], store.layouts[-1]
    assert layer.decay_numel % QBLOCK and 0 < store.shard_bounds(1, 1, 2)[0] < layer.decay_numel
    assert head.decay_numel == 0 and store.shard_bounds(store.num_layers - 1, 1, 2) == (256, head.numel)
    assert store.shard_bounds(store.num_layers - 1, 0, 3) == (0, 0)


def test_node_share_checks_its_fields():
    with pytest.raises(ValueError, match="NodeShare name 'a/b'"):
        NodeShare("a/b", 0, 2, lambda: None)
    with pytest.raises(ValueError, match=r"local_rank 2 is not in \[0, 2\)"):
        NodeShare("job", 2, 2, lambda: None)
    with pytest.raises(ValueError, match="barrier must be callable"):
        NodeShare("job", 0, 2, None)


def test_a_sharded_driver_needs_a_store_shared_by_its_ranks():
    store = HostStore(worker.CFG, torch.bfloat16)
    with pytest.raises(ValueError, match=r"shard=\(1, 2\) needs a store shared by 2 local ranks as rank 1"):
        OptimizerDriver(store, worker.TRAIN, shard=(1, 2))


def test_threads_divide_the_cores_between_local_ranks(monkeypatch):
    import horizon_triton.host.optimizer as optimizer
    monkeypatch.setattr(optimizer, "default_num_threads", lambda: 64)
    assert optimizer_threads(ht.TrainConfig()) == 63
    assert optimizer_threads(ht.TrainConfig(), local_world=8) == 7
    assert optimizer_threads(ht.TrainConfig(optimizer_threads=3), local_world=8) == 3


def test_a_shm_too_small_for_the_store_is_refused_before_anything_is_created(monkeypatch):
    import horizon_triton.host.node_store as node_store
    real = os.statvfs

    class Small:
        f_bavail, f_frsize = 1000, 4096           # 4.1 MB free
    monkeypatch.setattr(node_store.os, "statvfs", lambda path: Small if path == SHM_DIR else real(path))
    name = f"test-{os.getpid()}-small"
    with pytest.raises(RuntimeError, match=r"needs 0\.01 GB in /dev/shm, which has 0\.00 GB free: enlarge it"):
        HostStore(worker.CFG, torch.bfloat16, shared=NodeShare(name, 0, 1, lambda: None))
    assert _leftovers(name) == []


def test_a_single_process_store_is_private():
    store = HostStore(worker.CFG, torch.bfloat16)
    assert store.shared is None and store.board is None
    assert not any(a.shared for a in store.allocations)
    ran = []
    store.fill_shared(lambda: ran.append(1))
    assert ran == [1]


# ---- several processes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_update_equals_one_process_bit_for_bit(world, tmp_path):
    """Each layout (bf16 split master, 8-bit moments, fp32): the ranks map one store, see each other's writes,
    each writes and updates only its shard for 3 steps; the store then holds, bit for bit, what one process
    updating everything holds, and every rank sees the same bytes. Closed and dropped, nothing stays mapped."""
    ranks = Ranks(worker.sharded_training, world, str(tmp_path))
    reports = ranks.collect(2 * world * len(worker.LAYOUTS), timeout=300)
    assert ranks.join() == [0] * world
    assert _leftovers(ranks.name) == []
    for layout in worker.LAYOUTS:
        assert all(reports[(r, f"{layout} mapped after close")] == [] for r in range(world))
        assert len({reports[(r, layout)] for r in range(world)}) == 1, f"{layout}: the ranks see different bytes"
        sharded, reference = torch.load(tmp_path / f"{layout}.pt"), worker.reference_state(layout)
        assert sharded.keys() == reference.keys()
        for key, expected in reference.items():
            assert torch.equal(sharded[key].view(torch.uint8), expected.view(torch.uint8)), f"{layout} {key}"


def test_a_killed_or_hung_peer_ends_the_wait_in_bounded_time():
    killed = worker.CTX.Event()
    ranks = Ranks(worker.dead_peer, 2, killed)
    pids = {r: v for (r, _), v in ranks.collect(2).items()}
    rank, what, (message, seconds) = ranks.get()
    assert (rank, what) == (0, "timeout")
    assert "local rank(s) [1] did not finish its optimizer update 1 of layer 0 within 1 s" in message
    assert seconds < 5
    os.kill(pids[1], signal.SIGKILL)      # not reaped yet: a zombie, which counts as gone
    killed.set()
    rank, what, (message, seconds) = ranks.get()
    assert (rank, what) == (0, "gone")
    assert f"local rank 1 (pid {pids[1]}) is gone" in message and seconds < 1
    assert ranks.join() == [0, -signal.SIGKILL]
    assert _leftovers(ranks.name) == []


def test_a_failed_fill_or_peer_update_is_raised_on_every_rank_naming_it():
    ranks = Ranks(worker.failing_peer, 2)
    reports = ranks.collect(4)
    assert reports[(0, "fill")] == "OSError: checkpoint unreadable"
    assert reports[(1, "fill")] == ("PeerError: local rank 0 failed: filling the shared store raised OSError: "
                                    "checkpoint unreadable")
    assert reports[(0, "wait_all")] == ("PeerError: local rank 1 failed: its optimizer update of step 1 raised "
                                        "RuntimeError: injected failure")
    assert reports[(1, "wait_all")] == "RuntimeError: injected failure"
    assert ranks.join() == [0, 0]
    assert _leftovers(ranks.name) == []


def test_a_creator_killed_during_the_rendezvous_leaves_nothing_in_shm():
    ranks = Ranks(worker.die_in_rendezvous, 2, barrier_timeout=3.0)
    reports = ranks.collect(2, timeout=60)
    assert len(reports[(0, "created")]) == 6            # the default layout's 5 kinds and the board
    assert reports[(1, "raised")] == "BrokenBarrierError"
    assert ranks.join() == [-signal.SIGKILL, 0]
    assert _leftovers(ranks.name) == []


def test_checkpoint_of_a_shared_store_is_written_and_read_by_local_rank_0(tmp_path):
    ranks = Ranks(worker.checkpoint, 2, str(tmp_path / "ckpt"))
    reports = ranks.collect(5)
    assert ranks.join() == [0, 0]
    trained = reports[(0, "trained")]
    assert reports[(1, "trained")] == trained
    assert "local rank 1 holds a shared store: only local rank 0 saves" in reports[(1, "save")]
    assert reports[(0, "loaded")] == reports[(1, "loaded")] == trained
    # the checkpoint is an ordinary one: a private store loads the same state
    from horizon_triton.state import training_state
    private = HostStore(worker.CFG, torch.bfloat16, optimizer_states="8bit")
    ckpt = training_state.find(tmp_path / "ckpt")
    training_state.load_into(private, ckpt, training_state.read(ckpt)[0])
    assert worker.digest(private) == trained
    assert _leftovers(ranks.name) == []


def test_each_rank_pins_the_shared_buffers_that_cross_the_bus():
    ranks = Ranks(worker.pinned, 2)
    reports = ranks.collect(8)
    assert ranks.join() == [0, 0]
    for rank in (0, 1):
        assert reports[(rank, "registered")], f"rank {rank}: registrations differ from the pinned buffers"
        assert reports[(rank, "grads kept")], f"rank {rank}: pinning cleared what local rank 0 wrote"
        assert reports[(rank, "unregistered")]
    assert reports[(0, "digest")] == reports[(1, "digest")]


MEMORY_CFG = dict(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16,
                  num_kv_heads=4, tie_word_embeddings=True)          # 106M parameters: a 1.5 GB store


@pytest.mark.slow
def test_two_ranks_take_one_stores_memory():
    """2 processes mapping one 14 B/param store of 106M parameters, every buffer written: what the store adds
    to the two processes' PSS together (shared pages count 1/2 in each) is one store's bytes, not two."""
    ranks = Ranks(worker.memory, 2, MEMORY_CFG, True, "fp32")
    reports = ranks.collect(2, timeout=600)
    assert ranks.join() == [0, 0]
    store_bytes = reports[(0, "memory")]["store_bytes"]
    added = sum(m["pss"] - m["pss_before"] for m in reports.values())
    # each rank's own heap (the step's temporaries, reused by malloc since the store left its heap) adds a few
    # percent: 1.107 seen under torch 2.11; two stores would be 2.0
    assert 0.95 * store_bytes < added < 1.15 * store_bytes, (added / store_bytes, reports)

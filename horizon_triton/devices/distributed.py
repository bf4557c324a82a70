"""Data parallelism over torch.distributed: the job's ranks, its process groups, the host-side exchanges of a
step, and how a failing rank ends the job.

Every rank runs a whole engine on its own micro-batches; the gradient of each layer is summed over the ranks on
the devices during the backward (scheduler.py), so every rank's update is the one a single process would make
with all ranks' micro-batches:

    step start   every rank's (micro-batches, counted tokens, tokens, DPO pairs): equal micro-batch counts are
                 checked, grad_scale = 1 / global counted tokens (DPO: each pair's weight 1 / global pairs)
    backward     each layer's fp32 accumulator (a LoRA run's: its adapters') all-reduced (sum) over ``group``
                 before its norm and copy-out
    step end     every rank's (loss sum, squared-norm part, DPO's metric sums) gathered and summed in rank
                 order, so the loss, the norm, the clip coefficient and the metrics are bit-identical everywhere

The context comes from a process group the caller initialized, or from torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR/PORT; LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK), which ``context`` initializes: NCCL for
CUDA devices, gloo otherwise. Host-side exchanges run on a second, gloo ``control`` group (CPU tensors, no device
sync); gradients on ``group``.

Faults: a rank whose work raises (``guard``) writes "rank R (host): Error: message" under ERROR_KEY in the job's
key-value store. Every host-side collective here is issued asynchronously and waited for by polling, which
also looks at that key (every POLL_S once the collective has taken longer than SPIN_S): a peer waiting for the
failed rank raises ``RankFailed`` with its message within a fraction of a second. A rank that dies without
raising (killed, out of memory) closes its connections: the peers' gloo collectives fail, and they say so.
Every rank that stops waits up to ACK_WAIT_S for the others to have read the message (rank 0 may host the
store), then leaves. The process-group timeout (HORIZON_TRITON_DIST_TIMEOUT, seconds; default 30 min) bounds
what remains: a rank that hangs without raising. On NCCL the gradients' collectives run on the devices, where
the host cannot poll them: a watcher thread polls the key and aborts this rank's communicators instead.

Misuse: a call every rank must make (Engine(...), fit, evaluate: ``begin``) is counted in the job's store under
its name, and a rank that exits says so there (at interpreter exit); a rank waiting in such a call's collectives
raises ``RankFailed`` saying how to call it once a peer has exited or made another call in its place, instead of
waiting for the timeout or reporting a vanished peer. Saves are written by rank 0 alone, with no collective
(``wait_for_save``: the other ranks that call them wait for the files).
"""
from __future__ import annotations

import atexit
import datetime
import pickle
import itertools
import os
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

ERROR_KEY = "horizon_triton/error"
ACK_KEY = "horizon_triton/error_seen"
ACK_WAIT_S = 10.0                 # a failing rank waits this long for its peers to have read its message
PEER_MESSAGE_WAIT_S = 2.0         # a rank whose collective failed waits this long for the failing rank's message
SPIN_S = 0.02                     # a collective's first this many seconds are waited for without the store
POLL_S = 0.05                     # then the error key is looked at this often
WATCH_INTERVAL_S = 1.0            # NCCL: how often the watcher looks for a peer's error
DEFAULT_TIMEOUT_S = 1800
CALL_KEY = "horizon_triton/call"      # /N: ranks that made their N-th call; /N/NAME: of them, named so; /N/rankR
EXIT_KEY = "horizon_triton/exited"    # ranks that have exited; /R: what rank R last called
SAVED_KEY = "horizon_triton/saved"    # /WHAT: rank 0 has written it
PEER_CHECK_S = 0.5                # how often a waiting rank looks for a peer that exited or made another call
EXIT_GRACE_S = 1.0                # a peer that exited may have finished this collective first: wait this long
EXIT_STORE_TIMEOUT_S = 5.0        # an exiting rank's note in the store gives up after this long
# one tensor in, one shard out (reduce_scatter_single from torch 2.13 on, reduce_scatter_tensor before)
_REDUCE_SCATTER_ONE_TENSOR = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class RankFailed(RuntimeError):
    """Another rank of the data-parallel job failed (its message), or vanished; this rank stopped with it."""


class AllWorks:
    """Several collectives' works as one: ``wait()`` waits for each (gloo may finish them in any order; on NCCL
    each makes the current stream wait)."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()


@dataclass
class DistContext:
    """This process's place in the job and its process groups (``node_of``: each rank's node index)."""
    rank: int
    world: int
    local_rank: int
    local_world: int
    node: int
    num_nodes: int
    backend: str                               # of ``group``: "nccl" | "gloo"
    group: object                              # every rank: the gradients' all-reduce
    control: object                            # every rank, gloo: host-side exchanges
    node_group: object                         # the ranks of this node
    cross_group: object | None                 # the ranks of this local index on every node (None: one node)
    node_of: list[int]                         # node index of each rank
    node_control: object = None                # the ranks of this node, gloo: host-side waits (the shared store)
    job_token: str = ""                        # rank 0's random token: names this job's shared memory
    store: object = None                       # the job's key-value store (the error key)
    failed: bool = False
    calls: int = 0                             # calls every rank must make, made so far (begin)
    current: tuple | None = None               # (number, name, how to call it) of the latest one
    _watcher: threading.Thread | None = None

    # ---- collectives ----------------------------------------------------------------------------------
    def collective(self, fn, *args, wait: bool = True, **kwargs):
        """Issues the collective ``fn(*args, **kwargs, async_op=True)`` and, unless wait=False (returns the
        work), waits for it while watching the error key; RankFailed (the failed rank's message) if a peer
        failed or the collective did."""
        if self.failed:
            raise RankFailed(f"rank {self.rank}: the data-parallel job has already stopped")
        try:
            work = fn(*args, **kwargs, async_op=True)
            if not wait:
                return work
            start, pause, next_check, misuse_since = time.monotonic(), 0.0002, 0.0, None
            while not work.is_completed():
                time.sleep(pause)
                pause = min(2 * pause, POLL_S)
                now = time.monotonic()
                if now - start > SPIN_S and not work.is_completed() and self._error_posted():
                    raise self._peer_failure("")
                if now - start > SPIN_S and now >= next_check:
                    next_check = now + PEER_CHECK_S
                    misuse = self._misuse_posted()
                    misuse_since = (misuse_since or now) if misuse else None
                    if misuse and now - misuse_since >= EXIT_GRACE_S and not work.is_completed():
                        raise RankFailed(misuse)
            work.wait()
            return work
        except RankFailed:
            raise
        except Exception as e:
            raise self._peer_failure(f"{type(e).__name__}: {e}") from None

    def _error_posted(self) -> bool:
        """Whether a rank has written its error into the store. A store that cannot be reached says nothing: rank
        0 hosts it and may have left once this collective completed on its side (a failed peer ends the
        collective itself, which wait() then reports)."""
        try:
            return self.store.check([ERROR_KEY])
        except Exception:
            return False

    def reduce_gradient(self, tensor: torch.Tensor, asynchronous: bool, shards: list | None = None):
        """The sum over every rank of ``tensor``, in place. Synchronous (CPU): an all-reduce on ``group``, watched
        for a failed peer. Asynchronous (CUDA): returns the last work, whose ``wait()`` makes the current stream
        wait for it; with ``shards`` (views of tensor, one per local rank, covering it) only this rank's shard
        gets the sum: a reduce-scatter inside the node (half an all-reduce's bytes), then an all-reduce of the
        shard across the nodes (the current stream first waits for the node's step). gloo's reduce-scatter
        cannot be watched for a failed peer (its work reports completion only to wait()), so the CPU path
        reduces the whole tensor: the bus is not what a CPU run is short of."""
        if not asynchronous:
            self.collective(dist.all_reduce, tensor, group=self.group)
            return None
        if shards is None:
            return self.collective(dist.all_reduce, tensor, group=self.group, wait=False)
        mine = shards[self.local_rank]
        work = self._reduce_onto_shards(tensor, shards)
        if self.cross_group is not None:
            work.wait()
            work = self.collective(dist.all_reduce, mine, group=self.cross_group, wait=False)
        return work

    def _reduce_onto_shards(self, tensor: torch.Tensor, shards: list):
        """The node's sum of each shard onto its local rank, in place, no copy: one reduce-scatter of the whole
        tensor when the shards are equal and in order; else (shard_bounds cuts on 256-element blocks, so the last
        is often shorter) one reduce per shard onto its owner. A reduce-scatter of a list of tensors would first
        copy every input into one flat buffer: a second copy of each fp32 accumulator."""
        sizes = {s.numel() for s in shards}
        ends = [tensor.data_ptr() + sum(s.numel() for s in shards[:i]) * tensor.element_size()
                for i in range(len(shards))]
        if len(sizes) == 1 and tensor.is_contiguous() and [s.data_ptr() for s in shards] == ends \
                and len(shards) * shards[0].numel() == tensor.numel():
            return self.collective(_REDUCE_SCATTER_ONE_TENSOR, shards[self.local_rank], tensor,
                                   group=self.node_group, wait=False)
        return AllWorks([self.collective(dist.reduce, shard, dst=dist.get_global_rank(self.node_group, owner),
                                         group=self.node_group, wait=False)
                         for owner, shard in enumerate(shards)])   # the same reduces in the same order everywhere

    def gather_rows(self, values: list[float]) -> torch.Tensor:
        """float64 [world, n]: every rank's ``values`` (host, control group), the same table on every rank."""
        mine = torch.tensor(values, dtype=torch.float64)
        rows = [torch.empty_like(mine) for _ in range(self.world)]
        self.collective(dist.all_gather, rows, mine, group=self.control)
        return torch.stack(rows)

    def union_ids(self, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Sorted int64: the distinct token ids of every rank's ``ids`` (sorted, distinct), through a
        vocabulary-sized byte mask reduced with MAX: V bytes a step, whatever the world size."""
        mask = torch.zeros(vocab_size, dtype=torch.uint8)
        mask[ids] = 1
        self.collective(dist.all_reduce, mask, op=dist.ReduceOp.MAX, group=self.control)
        return mask.nonzero().reshape(-1)

    def gather_objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order (all_gather_object, but watched as every collective)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [int(n) for n in self.gather_rows([data.numel()])[:, 0].tolist()]
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[:data.numel()] = data
        rows = [torch.empty_like(padded) for _ in range(self.world)]
        self.collective(dist.all_gather, rows, padded, group=self.control)
        return [pickle.loads(row[:n].numpy().tobytes()) for row, n in zip(rows, sizes)]

    def same_everywhere(self, what: str, fields: dict) -> None:
        """ValueError on every rank, naming the field and the ranks, if some field of ``fields`` differs."""
        gathered = self.gather_objects(fields)
        for name in fields:
            values = {}
            for r, f in enumerate(gathered):
                values.setdefault(repr(f.get(name)), []).append(r)
            if len(values) > 1:
                shown = "; ".join(f"{v} on ranks {_ranks(rs)}" for v, rs in values.items())
                raise ValueError(f"{what} differs across the data-parallel ranks: {name} is {shown}. Every rank "
                                 "must run the same configuration")

    def any_rank(self, flags: list[bool]) -> list[bool]:
        """For each flag: whether some rank raised it (host, control group)."""
        table = self.gather_rows([float(f) for f in flags])
        return [bool(x) for x in table.amax(dim=0).tolist()]

    def step_counts(self, step: int, micro_batches: int, tokens: int, positions: int,
                    pairs: int = 0) -> tuple[int, int, int]:
        """Step start: (counted tokens, token positions, DPO's preference pairs) summed over the ranks, after
        checking that every rank brings as many micro-batches (0: its loader ended). ValueError on every rank
        otherwise."""
        table = self.gather_rows([micro_batches, tokens, positions, pairs])
        counts = [int(c) for c in table[:, 0].tolist()]
        if len(set(counts)) > 1:
            by_count = {}
            for r, c in enumerate(counts):
                by_count.setdefault(c, []).append(r)
            shown = "; ".join(f"{c} on ranks {_ranks(rs)}" for c, rs in sorted(by_count.items()))
            ended = " (a 0: that rank's loader had ended)" if 0 in by_count else ""
            raise ValueError(f"optimizer step {step}: the data-parallel ranks bring different numbers of "
                             f"micro-batches: {shown}{ended}. Give every rank's loader the same number of "
                             "micro-batches (e.g. every world_size-th batch of one loader, the remainder dropped)")
        tokens, positions, pairs = table[:, 1:].sum(dim=0).tolist()
        return int(tokens), int(positions), int(pairs)

    def step_totals(self, loss_sum: float, sq_norm: float, sharded: bool,
                    sums: list[float] = ()) -> tuple[float, float, list[float]]:
        """Step end: the loss sum over every rank, the squared gradient norm (each rank's part summed over the
        ranks of one node when each streams out a shard of the reduced gradient, else any rank's: the reduced
        gradient is the same on all) and each of ``sums`` (DPO's metric sums) over every rank. Summed in rank
        order from one gathered table: bit-identical everywhere."""
        table = self.gather_rows([loss_sum, sq_norm, *sums])
        loss = sum(table[:, 0].tolist())
        totals = [sum(column) for column in table[:, 2:].t().tolist()]
        if not sharded:
            return loss, table[0, 1].item(), totals
        node0 = [r for r in range(self.world) if self.node_of[r] == 0]
        return loss, sum(table[node0, 1].tolist()), totals

    def barrier(self) -> None:
        self.collective(dist.barrier, group=self.control)

    def node_barrier(self) -> None:
        """Returns when every rank of this node has called it (the node-shared store's rendezvous)."""
        self.collective(dist.barrier, group=self.node_control)

    @property
    def node_store_name(self) -> str:
        """The name of this node's shared host store: unique to the job and the node."""
        return f"{self.job_token}-node{self.node}"

    # ---- calls every rank must make, and rank 0's saves ---------------------------------------------------
    def begin(self, name: str, how: str) -> None:
        """Host, as this rank enters a call every rank must make (``name``; ``how``: how to call it right, for
        the error a misuse gets): counted in the job's store, in program order (see ``misuse``)."""
        self.calls += 1
        self.current = (self.calls, name, how)
        key = f"{CALL_KEY}/{self.calls}"
        self.store.set(f"{key}/rank{self.rank}", name)
        self.store.add(f"{key}/{name}", 1)      # first the named count, then the total (misuse reads the other way)
        self.store.add(key, 1)

    def misuse(self) -> str | None:
        """What keeps this rank's current call from ever completing, if the store says so: a peer that exited,
        or one whose call of the same number is another one. None otherwise (the peers may just be slower)."""
        number, name, how = self.current or (0, "this collective", "on every rank")
        what = f"{name} must be called on every rank of the data-parallel job ({how})"
        if self.store.add(EXIT_KEY, 0):
            gone = [r for r in range(self.world) if r != self.rank and self.store.check([f"{EXIT_KEY}/{r}"])]
            done = "; ".join(f"rank {r} after {self.store.get(f'{EXIT_KEY}/{r}').decode()}" for r in gone)
            return f"{what}, but ranks have exited ({done}) while rank {self.rank} waited in it"
        if number:
            key = f"{CALL_KEY}/{number}"
            total = self.store.add(key, 0)
            if self.store.add(f"{key}/{name}", 0) < total:
                others = [(r, self.store.get(f"{key}/rank{r}").decode()) for r in range(self.world)
                          if self.store.check([f"{key}/rank{r}"])]
                shown = "; ".join(f"rank {r} called {n}" for r, n in others if n != name)
                return f"{what}, but another call was made in its place ({shown}) while rank {self.rank} waited in it"
        return None

    def _misuse_posted(self) -> str | None:
        """misuse(), where the store can be reached (as _error_posted: rank 0 hosts it and may have left)."""
        try:
            return self.misuse()
        except Exception:
            return None

    def saved(self, what: str) -> None:
        """Rank 0, after writing ``what`` (a save and its number): wait_for_save(what) returns."""
        self.store.set(f"{SAVED_KEY}/{what}", "1")

    def wait_for_save(self, what: str, call: str) -> None:
        """A rank other than 0 in ``call`` (save_pretrained, save_checkpoint): returns once rank 0 has written
        ``what``; RankFailed if rank 0 failed, exited without writing it, or took longer than the timeout."""
        key = f"{SAVED_KEY}/{what}"
        deadline = time.monotonic() + float(os.environ.get("HORIZON_TRITON_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
        late = (f"{call}: rank 0 writes the files, and it exited without writing them ({what}; call {call} on rank "
                "0, alone or on every rank)")
        while True:
            try:
                if self.store.check([key]):
                    return
                if self.store.check([ERROR_KEY]):
                    raise self._peer_failure("")
                if self.store.check([f"{EXIT_KEY}/0"]) and not self.store.check([key]):
                    raise RankFailed(late)
            except (RankFailed, KeyboardInterrupt):
                raise
            except Exception as e:      # the store's host was rank 0's process
                raise RankFailed(f"{late} ({type(e).__name__}: {str(e)[:200]})") from None
            if time.monotonic() > deadline:
                raise RankFailed(f"{call}: rank 0 did not write {what} within HORIZON_TRITON_DIST_TIMEOUT")
            time.sleep(POLL_S)

    def _note_exit(self) -> None:
        """At interpreter exit: this rank is gone (``misuse`` tells the peers still waiting for it). Rank 0 then
        waits (up to ACK_WAIT_S) for the others to have exited too: it may host the store, where a rank still
        waiting for its last save would find the key gone with it."""
        try:
            self.store.set_timeout(datetime.timedelta(seconds=EXIT_STORE_TIMEOUT_S))
            self.store.set(f"{EXIT_KEY}/{self.rank}", self.current[1] if self.current else "starting")
            self.store.add(EXIT_KEY, 1)
            deadline = time.monotonic() + ACK_WAIT_S
            while self.rank == 0 and self.store.add(EXIT_KEY, 0) < self.world and time.monotonic() < deadline:
                time.sleep(POLL_S)
        except Exception:               # the store's host is gone already: nobody is left to tell
            pass

    # ---- faults ---------------------------------------------------------------------------------------
    def guard(self):
        """Context manager around a rank's work: an error (not a peer's, not a signal's stop) is reported to the
        job before it propagates, so that every peer stops with it."""
        return _Guard(self)

    def fail(self, error: BaseException) -> None:
        """Tells the job this rank failed with ``error``, breaks its collectives, waits for the peers to know."""
        if self.failed:
            return
        message = f"rank {self.rank} ({socket.gethostname()}): {type(error).__name__}: {error}"
        if not str(error):
            message += "".join(traceback.format_exception(type(error), error, error.__traceback__)[-3:])
        try:
            if not self.store.check([ERROR_KEY]):     # the first failure is the one reported
                self.store.set(ERROR_KEY, message)
            self.store.add(ACK_KEY, 1)
        except Exception:                             # the store's host is gone: the peers find out anyway
            pass
        self.failed = True
        self._leave()

    def _peer_failure(self, transport_error: BaseException) -> RankFailed:
        """After a failed collective: the failing rank's message as RankFailed (every rank waits for the others
        to have read it before it leaves: rank 0 may host the store)."""
        message = None
        try:
            deadline = time.monotonic() + PEER_MESSAGE_WAIT_S
            while message is None and time.monotonic() < deadline:
                if self.store.check([ERROR_KEY]):
                    message = self.store.get(ERROR_KEY).decode()
                else:
                    time.sleep(0.05)
                if message is None and self.current is not None and self._misuse_posted() is not None:
                    break
            if message is not None and not self.failed:
                self.store.add(ACK_KEY, 1)
        except Exception:
            pass
        self.failed = True
        if message is not None:       # nobody needs the store to outlive this rank when no message was left
            self._leave()
        misuse = self._misuse_posted() if message is None else None
        if misuse is not None:
            return RankFailed(misuse)
        if message is None:
            return RankFailed(f"rank {self.rank}: a peer of the data-parallel job vanished without reporting an "
                              f"error (killed? out of host memory?): {str(transport_error)[:300]}")
        return RankFailed(f"the data-parallel job stopped: {message}")

    def _leave(self) -> None:
        """Waits (bounded) until every rank has acknowledged the error, so that a store hosted here outlives
        their reading it."""
        deadline = time.monotonic() + ACK_WAIT_S
        try:
            while self.store.add(ACK_KEY, 0) < self.world and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:
            pass

    def _watch(self) -> None:
        """NCCL only: a peer's error aborts this rank's communicators, which ends its pending collectives."""
        while not self.failed:
            try:
                if self.store.check([ERROR_KEY]):
                    for g in (self.group, self.node_group, self.cross_group):
                        abort = getattr(g, "abort", None)
                        if abort is not None:
                            abort()
                    return
            except Exception:
                return
            time.sleep(WATCH_INTERVAL_S)


class _Guard:
    def __init__(self, ctx: DistContext):
        self.ctx = ctx

    def __enter__(self):
        return self.ctx

    def __exit__(self, kind, error, tb):
        if error is not None and not isinstance(error, (RankFailed, KeyboardInterrupt, SystemExit)):
            self.ctx.fail(error)
        return False


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


_CONTEXT: dict = {}               # the default process group -> its context (one a process)
_OPENED: list = []                # the process group context() initialized itself (close() ends it)


def context(device_type: str = "cpu") -> DistContext | None:
    """The data-parallel context of this process, or None when it runs alone (world size 1, no process group,
    no torchrun environment). Initializes the default process group from torchrun's environment when the caller
    has not (NCCL if ``device_type`` is "cuda", else gloo); built once, then returned again."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        world = _env_int("WORLD_SIZE")
        if world is None or world <= 1:
            return None
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun (or set "
                             "RANK, MASTER_ADDR and MASTER_PORT), or initialize torch.distributed yourself")
        timeout = datetime.timedelta(seconds=float(os.environ.get("HORIZON_TRITON_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        backend = "nccl" if device_type == "cuda" else "gloo"
        if backend == "nccl":      # as make_device: one GPU a local rank (or the one a launcher left visible)
            torch.cuda.set_device((_env_int("LOCAL_RANK") or 0) % torch.cuda.device_count())
        dist.init_process_group(backend, timeout=timeout)
        _OPENED.append(dist.group.WORLD)
    default = dist.group.WORLD
    if default in _CONTEXT:
        return _CONTEXT[default]
    if dist.get_world_size() <= 1:
        return None
    _CONTEXT[default] = ctx = _build(device_type)
    return ctx


def _build(device_type: str) -> DistContext:
    rank, world = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    if device_type == "cuda" and backend != "nccl":
        raise ValueError(f"device cuda with a {backend} process group: initialize torch.distributed with "
                         "backend='nccl' for CUDA devices")
    if device_type != "cuda" and "gloo" not in str(backend):
        raise ValueError(f"device {device_type} with a {backend} process group: CPU tensors need backend='gloo'")
    control = dist.new_group(backend="gloo") if backend == "nccl" else dist.group.WORLD
    # where each rank runs: torchrun's node rank and local rank if it set them, else ranks grouped by host name
    mine = (_env_int("GROUP_RANK"), _env_int("LOCAL_RANK"), socket.gethostname(), uuid.uuid4().hex[:16])
    places = [None] * world
    dist.all_gather_object(places, mine, group=control)
    if all(p[0] is not None and p[1] is not None for p in places):
        keys = [p[0] for p in places]
    else:
        keys = [p[2] for p in places]
    nodes = list(dict.fromkeys(keys))
    node_of = [nodes.index(k) for k in keys]
    members = [[r for r in range(world) if node_of[r] == n] for n in range(len(nodes))]
    sizes = {len(m) for m in members}
    if len(sizes) != 1:
        raise ValueError(f"the nodes run different numbers of ranks ({[len(m) for m in members]}): give every "
                         "node the same --nproc-per-node")
    node = node_of[rank]
    local_rank, local_world = members[node].index(rank), len(members[node])
    node_group, node_control, cross_group = dist.group.WORLD, control, None
    if len(nodes) > 1:                 # every rank creates every group, in the same order
        for n, ranks in enumerate(members):
            g = dist.new_group(ranks)
            node_group = g if n == node else node_group
            g = dist.new_group(ranks, backend="gloo") if backend == "nccl" else g
            node_control = g if n == node else node_control
        for local in range(local_world):
            g = dist.new_group([m[local] for m in members])
            cross_group = g if local == local_rank else cross_group
    ctx = DistContext(rank, world, local_rank, local_world, node, len(nodes), str(backend), dist.group.WORLD,
                      control, node_group, cross_group, node_of, node_control, job_token=places[0][3],
                      store=dist.distributed_c10d._get_default_store())
    atexit.register(ctx._note_exit)
    if ctx.backend == "nccl":
        ctx._watcher = threading.Thread(target=ctx._watch, daemon=True, name="horizon-triton-fault-watch")
        ctx._watcher.start()
    return ctx


def close() -> None:
    """Ends the process group ``context`` initialized (none that the caller did), after a job that went well:
    every rank calls it (NCCL warns at exit about a group left open)."""
    if _OPENED and dist.is_initialized() and dist.group.WORLD is _OPENED[0]:
        _CONTEXT.clear()
        dist.destroy_process_group()
    _OPENED.clear()


def is_main_process() -> bool:
    """Rank 0 of an initialized job, or a process that runs alone: the one that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ------------------------------------------------------------------------------------------------------------
# loaders
# ------------------------------------------------------------------------------------------------------------
class ShardedLoader:
    """Every ``world``-th batch of a loader with a length, from the ``rank``-th: of its first len - len % world
    batches (every rank the same count; the remainder dropped) unless drop_remainder=False (evaluation)."""

    def __init__(self, loader, rank: int, world: int, drop_remainder: bool = True):
        self.loader, self.rank, self.world, self.drop_remainder = loader, rank, world, drop_remainder

    def __len__(self) -> int:
        n = len(self.loader)
        return n // self.world if self.drop_remainder else len(range(self.rank, n, self.world))

    def __iter__(self):
        stop = len(self.loader) // self.world * self.world if self.drop_remainder else None
        return itertools.islice(self.loader, self.rank, stop, self.world)


def shard_loader(loader, ctx: DistContext | None, drop_remainder: bool = True):
    """This rank's batches of ``loader`` (a loader with a length: ShardedLoader; an endless iterable: every
    world-th item from the rank-th); ``loader`` itself when running alone."""
    if ctx is None:
        return loader
    if hasattr(loader, "__len__"):
        return ShardedLoader(loader, ctx.rank, ctx.world, drop_remainder)
    return itertools.islice(loader, ctx.rank, None, ctx.world)


# ------------------------------------------------------------------------------------------------------------
# launching without torchrun
# ------------------------------------------------------------------------------------------------------------
def _spawned(local_rank: int, fn, world: int, port: int, args, env: dict) -> None:
    os.environ.update({"RANK": str(local_rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                       "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), **env})
    fn(local_rank, *args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, args: tuple = (), env: dict | None = None) -> None:
    """Runs ``fn(rank, *args)`` in ``world`` fresh processes on this machine, each with torchrun's environment
    (one node), so that Engine or ``context`` inside ``fn`` joins them; raises if one of them fails.
    ``fn`` must be importable (a module-level function). torchrun does the same for scripts and the CLI."""
    import torch.multiprocessing as mp
    mp.spawn(_spawned, args=(fn, world, free_port(), args, dict(env or {})), nprocs=world, join=True)

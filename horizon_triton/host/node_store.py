"""One host store per node: the local ranks of a data-parallel job map the same memory.

Local rank 0 creates each of the store's arenas (store.py) as a file in POSIX shared memory (/dev/shm), the
other local ranks map the same files, and every rank unlinks them as soon as all have mapped: from then on the
memory has no name, so a process that dies leaves nothing behind, and the kernel frees the pages when the last
mapping goes. The only window for a leftover is the rendezvous itself, between the creation of the files and
the second barrier; a rank whose barrier fails there (a peer died) unlinks them before raising.

Beside the arenas, a small board (NodeBoard) in the same shared memory lets the ranks wait for each other
without a collective: per rank, the update generation each layer has reached, its pid (to see a peer that is
gone), an error flag with a message, and the count of fills (weights loaded by local rank 0). Waits poll it with
a short sleep and end with an error naming the rank when a peer failed, died, or took longer than the timeout.

Use, in every local rank (the barrier: one over the node's ranks, e.g. torch.distributed.barrier on a group of
the local ranks):

    share = NodeShare(name, local_rank, local_world, barrier)
    store = HostStore(cfg, dtype, pin=..., optimizer_states=..., shared=share)
    store.fill_shared(lambda: load_weights(store, path))        # local rank 0 writes, the others wait
    optimizer = OptimizerDriver(store, train_cfg, shard=(local_rank, local_world))
    # each step: rank r writes grad[i][lo:hi], (lo, hi) = store.shard_bounds(i, r, local_world), then
    # optimizer.start_step(...); optimizer.wait_layer(i) returns once every local rank updated its part of i

The NodeShare's name must be unique among the jobs of a node (e.g. the rendezvous id and port of the job, or
a uuid broadcast by rank 0); /dev/shm must have room for the whole store (containers often give it 64 MB).
Liveness is judged by pid, so a peer in another pid namespace is only caught by the timeout.

Writes by one process are seen by the others through the board's plain stores (x86's total store order; ARM's
would need fences, which Python's syscalls around the poll give in practice, not by contract).
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..state.durable import process_alive

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
BOARD = "board"                   # the board's segment, beside the store's kinds
PEER_TIMEOUT_S = 1800.0           # a peer that has not finished a layer's update by then is taken as hung


@dataclass(frozen=True)
class NodeShare:
    """How this process shares a node's store: ``name`` unique to the job (and node), this process's
    ``local_rank`` of ``local_world``, and ``barrier()``, which returns when every local rank has called it
    (a process group's barrier, a multiprocessing.Barrier's wait). ``timeout_s`` bounds each wait for a peer."""
    name: str
    local_rank: int
    local_world: int
    barrier: Callable[[], object]
    timeout_s: float = PEER_TIMEOUT_S

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(f"NodeShare name {self.name!r}: use 1-200 letters, digits, '_', '.' or '-' (it names "
                             f"files in {SHM_DIR})")
        if not isinstance(self.local_world, int) or self.local_world < 1:
            raise ValueError(f"NodeShare local_world must be an int ≥ 1, got {self.local_world!r}")
        if not isinstance(self.local_rank, int) or not 0 <= self.local_rank < self.local_world:
            raise ValueError(f"NodeShare local_rank {self.local_rank!r} is not in [0, {self.local_world})")
        if not callable(self.barrier):
            raise ValueError("NodeShare barrier must be callable: it returns when every local rank has called it")

    @property
    def creator(self) -> bool:
        return self.local_rank == 0

    def segment_path(self, kind: str) -> str:
        return os.path.join(SHM_DIR, f"horizon-{self.name}-{kind}")


def map_segments(share: NodeShare, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """kind -> uint8 tensor of sizes[kind] bytes (page-aligned, zero-filled when created) mapping one shared
    segment, the same memory in every local rank. Calls share.barrier() twice (created; mapped by all); the
    names are gone when it returns."""
    if not os.path.isdir(SHM_DIR):
        raise RuntimeError(f"a shared host store needs POSIX shared memory at {SHM_DIR} (Linux)")
    paths = {kind: share.segment_path(kind) for kind, n in sizes.items() if n}
    # what this rank unlinks if anything fails: the creator what it made (never another job's files), the
    # others every name (their creator may have died after making them)
    ours = [] if share.creator else list(paths.values())
    try:
        if share.creator:
            _check_room(sum(sizes.values()))
            for kind, path in paths.items():
                _create(path, sizes[kind], share.name)
                ours.append(path)
        share.barrier()
        mapped = {kind: (torch.from_file(paths[kind], shared=True, size=n, dtype=torch.uint8) if n
                         else torch.empty(0, dtype=torch.uint8)) for kind, n in sizes.items()}
        share.barrier()
    finally:                      # every rank unlinks: the first one to get here removes the names
        for path in ours:
            _unlink(path)
    return mapped


def _check_room(nbytes: int) -> None:
    """The segments are sparse until written: a tmpfs too small for them would kill the first process to write
    past its end with SIGBUS, long after the start. Refuse at once instead."""
    fs = os.statvfs(SHM_DIR)
    free = fs.f_bavail * fs.f_frsize
    if free < nbytes:
        raise RuntimeError(f"the shared host store needs {nbytes / 1e9:.2f} GB in {SHM_DIR}, which has "
                           f"{free / 1e9:.2f} GB free: enlarge it (a container: docker run --shm-size=..., "
                           f"Kubernetes: an emptyDir with medium Memory on {SHM_DIR}; a host: mount -o remount,"
                           f"size=... {SHM_DIR}), or run one process per node")


def _create(path: str, nbytes: int, name: str) -> None:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except FileExistsError:
        raise FileExistsError(f"{path} exists: another job uses the NodeShare name {name!r} (or a run killed while "
                              f"its ranks were mapping it left it; remove it if no job runs)") from None
    try:
        os.ftruncate(fd, nbytes)   # tmpfs: pages are taken when first written, and read as zeros until then
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class PeerError(RuntimeError):
    """A local rank failed, died or hung while this one waited for it."""


class NodeBoard:
    """The local ranks' shared progress board (int64 cells in a shared segment):

        done[rank, layer]   the update generation that rank's optimizer has completed on that layer
        pid[rank], pidns[rank]   the rank's process (0 until it registered), its pid namespace
        failed[rank]        1 once the rank raised; message[rank] says what (utf-8, truncated)
        fills[0]            how many times local rank 0 has filled the store (loaded weights or a checkpoint)
    """
    MESSAGE_BYTES = 512
    _EXTRA = 4                    # pid, pid namespace, failed, fills

    def __init__(self, share: NodeShare, segment: torch.Tensor, num_layers: int):
        self.share, self.num_layers = share, num_layers
        cells = share.local_world * (num_layers + self._EXTRA)
        self._cells = segment[:cells * 8].view(torch.int64).view(share.local_world, num_layers + self._EXTRA)
        self._messages = segment[cells * 8:].view(share.local_world, self.MESSAGE_BYTES)
        self._done = self._cells[:, :num_layers]
        self._pid, self._pidns, self._failed, self._fills = (self._cells[:, num_layers + k] for k in range(4))
        self._pidns[share.local_rank] = _pid_namespace()
        self._pid[share.local_rank] = os.getpid()
        self._fills_seen = 0

    @classmethod
    def nbytes(cls, local_world: int, num_layers: int) -> int:
        return local_world * ((num_layers + cls._EXTRA) * 8 + cls.MESSAGE_BYTES)

    # ---- this rank's entries ----------------------------------------------------------------------------
    def mark_done(self, layer: int, generation: int) -> None:
        self._done[self.share.local_rank, layer] = generation

    def mark_failed(self, what: str) -> None:
        text = what.encode("utf-8", "replace")[:self.MESSAGE_BYTES - 1]
        row = self._messages[self.share.local_rank]
        row.zero_()
        row[:len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self._failed[self.share.local_rank] = 1

    # ---- waiting for the peers --------------------------------------------------------------------------
    def wait_layer(self, layer: int, generation: int) -> None:
        """Returns once every local rank has completed update ``generation`` of ``layer``."""
        self._wait(lambda: int(self._done[:, layer].min()) >= generation,
                   lambda r: int(self._done[r, layer]) < generation,
                   f"its optimizer update {generation} of layer {layer}")

    def wait_all(self, generation: int) -> None:
        """Returns once every local rank has completed update ``generation`` of every layer."""
        self._wait(lambda: int(self._done.min()) >= generation,
                   lambda r: int(self._done[r].min()) < generation, f"its optimizer update {generation}")

    def publish_fill(self) -> None:
        """Local rank 0: the store's values are written (the other ranks' wait_fill returns)."""
        self._fills_seen += 1
        self._fills[0] = self._fills_seen

    def wait_fill(self) -> None:
        """Other ranks: returns once local rank 0 has filled the store as often as this rank has waited. No
        timeout (loading a terabyte checkpoint takes what the disk takes): only rank 0's failure or exit ends it."""
        self._fills_seen += 1
        seen = self._fills_seen
        self._wait(lambda: int(self._fills[0]) >= seen, lambda r: r == 0, "filling the shared store",
                   bounded=False)

    def _wait(self, ready, lagging, what: str, bounded: bool = True) -> None:
        """Polls ready() until true; raises PeerError if a peer failed, a lagging peer is gone, or (bounded)
        after the NodeShare's timeout_s."""
        timeout = self.share.timeout_s
        start, pause, next_check = time.monotonic(), 2e-5, 0.0
        while not ready():
            failure = self.peer_failure()
            if failure is not None and not ready():    # a peer marks its failure after what it completed
                raise PeerError(failure)
            now = time.monotonic()
            if now >= next_check:            # the /proc reads every 50 ms, not every poll
                self._raise_gone(lagging)
                next_check = now + 0.05
            if bounded and now - start > timeout:
                ranks = [r for r in range(self.share.local_world) if lagging(r)]
                raise PeerError(f"local rank(s) {ranks} did not finish {what} within {timeout:g} s "
                                f"(NodeShare timeout_s); hung or much slower than local rank "
                                f"{self.share.local_rank}")
            time.sleep(pause)
            pause = min(2 * pause, 2.5e-4)    # a peer's mark is seen within 0.25 ms: small beside a layer

    def peer_failure(self) -> str | None:
        """'local rank R failed: what it raised' for the first peer that marked a failure, else None."""
        for r in range(self.share.local_world):
            if r != self.share.local_rank and int(self._failed[r]):
                text = bytes(self._messages[r].tolist()).split(b"\0", 1)[0].decode("utf-8", "replace")
                return f"local rank {r} failed: {text}"
        return None

    def _raise_gone(self, lagging) -> None:
        ours = _pid_namespace()
        for r in range(self.share.local_world):
            pid = int(self._pid[r])
            # a peer that has not registered yet, or in another pid namespace, is left to the timeout
            known = r != self.share.local_rank and pid and int(self._pidns[r]) == ours
            if known and lagging(r) and not process_alive(pid):
                failure = self.peer_failure()      # a peer that failed, then exited: its error says more
                if failure is not None:
                    raise PeerError(failure)
                raise PeerError(f"local rank {r} (pid {pid}) is gone: it exited or was killed while local rank "
                                f"{self.share.local_rank} waited for it")

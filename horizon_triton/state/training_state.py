"""Training checkpoints: every state buffer of the host store, whatever its kinds, plus the step, the lr schedule,
the RNG state, the data position and the configs, in a directory that appears whole or not at all.

    ROOT/step-00000120/
        state-00001-of-00003.safetensors   the store's state buffers, one group of consecutive layers a file
        trainer_state.json                 step, micro-batches consumed, schedule, RNG, configs, extra
        manifest.json                      written last: each file's size and checksum (Checksum), each
                                           tensor's kind, layer, dtype, size

A tensor is named "<layer>.<kind>" ("layers.3.exp_avg"). What is saved is what ``store.state_buffers()`` yields,
described by ``store.allocations``, so a store with other kinds (a split master, 8-bit moments with their
scales) is saved, and checked on loading, with no change here.

The files are standard safetensors (any safetensors reader opens them), written here directly: the 8-byte header
length, the JSON header, then each buffer streamed from its own memory in large writes, so saving makes no copy
of the state in RAM (a 1 TB state goes straight to the disk) and runs at the disk's sequential write speed.
Loading reads the bytes straight into the store's buffers, after every file was checked against the manifest:
a truncated, foreign or mismatched checkpoint is refused before anything is overwritten; a corrupted one (its
checksum, verified as the bytes arrive) once they are read (from_checkpoint then returns no engine).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import durable
from ..config import ModelConfig, TrainConfig
from ..host.store import HostStore
from ..models.generic.config import GenericConfig

FORMAT = "horizon-triton training checkpoint"
VERSION = 1
SHARD_BYTES = 2 * 2**30          # a shard holds whole layers, about this many bytes (one layer may exceed it)
WRITE_CHUNK = 64 * 2**20         # bytes per write call (one call may not exceed 2 GiB on Linux)
MANIFEST, TRAINER_STATE = "manifest.json", "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPE_NAMES = {str(d).replace("torch.", ""): d for d in SAFETENSORS_DTYPES}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, truncated, foreign or made for another model."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _state_tensors(store: HostStore) -> list[tuple[str, str, int, torch.Tensor]]:
    """(tensor name, kind, layer index, buffer) for every state buffer, layer by layer (within a layer in the
    store's order), so that a shard holds whole layers whatever order the store allocates its kinds in."""
    tensors = [(f"{store.layouts[layer].name}.{kind}", kind, layer, t) for kind, layer, t in store.state_buffers()]
    return sorted(tensors, key=lambda entry: entry[2])


def expected_tensors(store: HostStore) -> dict[str, dict]:
    """What a checkpoint of this store holds: name -> kind, layer, dtype, numel (from store.allocations)."""
    sizes = {(a.kind, a.layer): a for a in store.allocations}
    out = {}
    for name, kind, layer, t in _state_tensors(store):
        a = sizes[(kind, layer)]
        out[name] = {"kind": kind, "layer": layer, "dtype": str(a.dtype).replace("torch.", ""), "numel": a.numel}
    return out


# ------------------------------------------------------------------------------------------------------------
# safetensors, streamed
# ------------------------------------------------------------------------------------------------------------
def _bytes_of(t: torch.Tensor) -> memoryview:
    """The buffer's own memory as bytes (no copy); works for every dtype, bf16 included."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


class Checksum:
    """A file's checksum: the CRC-32 of each piece of it (the header, then each tensor in WRITE_CHUNK pieces),
    computed on helper threads while the caller writes or reads the next pieces (zlib releases the GIL, so the
    checksum keeps up with the disk), and a CRC-32 over those, in order. Writing and reading cut a file into
    the same pieces. ``value()`` waits for every piece."""

    THREADS = max(1, min(8, (os.cpu_count() or 2) - 1))   # one core stays with the thread doing the I/O

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=self.THREADS)
        self._pieces = []

    def add(self, piece) -> None:
        """Queues a piece; the caller must not change its bytes before value() returns."""
        self._pieces.append(self._pool.submit(zlib.crc32, piece))

    def value(self) -> str:
        crcs = [f.result() for f in self._pieces]
        self._pool.shutdown()
        return f"crc32-pieces:{zlib.crc32(struct.pack(f'<{len(crcs)}I', *crcs)):08x}"


def checksum_of(data: bytes) -> str:
    return f"crc32:{zlib.crc32(data):08x}"


def write_safetensors(path: Path, tensors: list[tuple[str, torch.Tensor]], metadata: dict | None = None,
                      checksums: dict | None = None) -> int:
    """Writes 1-D contiguous CPU tensors as one safetensors file, fsynced; returns its size in bytes. With
    ``checksums``, checksums[path.name] is set to the CRC-32 of the bytes written."""
    header, offset = {}, 0
    for name, t in tensors:
        if t.dtype not in SAFETENSORS_DTYPES or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"{name}: cannot stream a {t.dtype} tensor on {t.device} (contiguous CPU tensors of "
                             f"{sorted(_DTYPE_NAMES)} only)")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": [t.numel()],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                  # the format aligns the data to 8 bytes
    checksum = Checksum()
    with durable.naming(path), open(path, "xb", buffering=0) as f:
        head = struct.pack("<Q", len(text)) + text
        checksum.add(head)
        f.write(head)
        for _, t in tensors:
            data = _bytes_of(t)
            for start in range(0, len(data), WRITE_CHUNK):
                chunk = data[start:start + WRITE_CHUNK]
                checksum.add(chunk)
                while chunk:
                    chunk = chunk[f.write(chunk):]
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):             # written and synced: the page cache may drop it
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    value = checksum.value()
    if checksums is not None:
        checksums[path.name] = value
    return 8 + len(text) + offset


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data) of a safetensors file; CheckpointError if it is not one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated ({size} bytes, not even a safetensors header)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100 * 2**20:
            raise CheckpointError(f"{path} is not a safetensors file or is truncated (header of {length} bytes in "
                                  f"a file of {size})")
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    return header, 8 + length


def _read_into(f, t: torch.Tensor, where: str, checksum: Checksum) -> None:
    """Reads the tensor's bytes in the pieces write_safetensors checksummed."""
    data = _bytes_of(t)
    for start in range(0, len(data), WRITE_CHUNK):
        piece = data[start:start + WRITE_CHUNK]
        done = 0
        while done < len(piece):
            n = f.readinto(piece[done:])
            if not n:
                raise CheckpointError(f"{where} ended early (truncated while loading)")
            done += n
        checksum.add(piece)


# ------------------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------------------
def _shards(tensors: list[tuple[str, str, int, torch.Tensor]]) -> list[list[tuple[str, torch.Tensor]]]:
    """Whole layers, in order, about SHARD_BYTES a shard."""
    shards, current, size, last_layer = [], [], 0, None
    for name, _, layer, t in tensors:
        if current and layer != last_layer and size >= SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, t))
        size += t.numel() * t.element_size()
        last_layer = layer
    if current:
        shards.append(current)
    return shards


def save(store: HostStore, root: Path, trainer_state: dict, keep_last: int | None = None) -> Path:
    """Writes ROOT/step-N (N = trainer_state["step"]) atomically and durably; keeps the newest keep_last.
    A store shared by a node's local ranks is one state: local rank 0 writes it, no other rank may."""
    if store.shared is not None and not store.shared.creator:
        raise ValueError(f"local rank {store.shared.local_rank} holds a shared store: only local rank 0 saves its "
                         "checkpoint (the other local ranks map the same memory)")
    root = Path(root)
    final = step_dir(root, trainer_state["step"])
    tmp = durable.temp_sibling(final)             # also removes what a killed save left in root
    try:
        tensors = _state_tensors(store)
        expected = expected_tensors(store)
        shards = _shards(tensors)
        files, checksums = {}, {}
        for i, shard in enumerate(shards):
            file = f"state-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            files[file] = write_safetensors(tmp / file, shard, metadata={"format": "pt"}, checksums=checksums)
            for name, _ in shard:
                expected[name]["file"] = file
        state_bytes = json.dumps(trainer_state, indent=1).encode()
        durable.write_file(tmp / TRAINER_STATE, state_bytes)
        files[TRAINER_STATE], checksums[TRAINER_STATE] = len(state_bytes), checksum_of(state_bytes)
        manifest = {"format": FORMAT, "version": VERSION, "step": trainer_state["step"],
                    "files": files, "checksums": checksums, "tensors": expected}
        durable.write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        durable.replace_dir(tmp, final)
    except BaseException:
        durable.discard_temp(tmp)
        raise
    if keep_last is not None:
        rotate(root, keep_last)
    return final


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in root, oldest first."""
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and (entry / MANIFEST).is_file():
                found.append((int(match[1]), entry))
    return sorted(found)


def rotate(root: Path, keep_last: int) -> None:
    """Deletes all but the newest keep_last complete checkpoints (each renamed away before it is deleted)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be ≥ 1, got {keep_last}")
    for _, path in checkpoints(root)[:-keep_last]:
        durable.discard_dir(path)


# ------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------
def find(path: str | Path) -> Path:
    """The checkpoint at ``path``, or the newest complete one under it (a directory of step-N checkpoints)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    found = checkpoints(path)
    if not found:
        hint = " (a save was interrupted before it completed)" if any(
            _STEP_DIR.match(e.name) or ".partial-" in e.name for e in path.iterdir()) else ""
        raise CheckpointError(f"no complete checkpoint in {path}: neither {MANIFEST} nor step-N/{MANIFEST} "
                              f"found{hint}")
    return found[-1][1]


def read(ckpt: Path) -> tuple[dict, dict]:
    """(manifest, trainer state) of a checkpoint, with every file's presence and size checked."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt} is not a horizon-triton training checkpoint: no {MANIFEST} (an "
                              "interrupted save, or another program's files)") from None
    except ValueError as e:
        raise CheckpointError(f"{ckpt / MANIFEST} is unreadable ({e}): truncated or not a checkpoint") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a horizon-triton training checkpoint ({MANIFEST} has no "
                              f"format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{ckpt}: checkpoint format version {manifest.get('version')}, this horizon-triton "
                              f"reads version {VERSION}")
    for file, size in manifest["files"].items():
        actual = (ckpt / file).stat().st_size if (ckpt / file).is_file() else None
        if actual is None:
            raise CheckpointError(f"{ckpt}: {file} is missing (the manifest lists it)")
        if actual != size:
            raise CheckpointError(f"{ckpt}: {file} has {actual} bytes, the manifest says {size} (truncated or "
                                  "overwritten)")
    state_bytes = (ckpt / TRAINER_STATE).read_bytes()
    _verify(ckpt, TRAINER_STATE, manifest, checksum_of(state_bytes))
    trainer_state = json.loads(state_bytes)
    return manifest, trainer_state


def _verify(ckpt: Path, file: str, manifest: dict, checksum: str) -> None:
    """Checkpoints written before checksums existed have none: their files are checked by size only."""
    expected = manifest.get("checksums", {}).get(file)
    if expected is not None and expected != checksum:
        raise CheckpointError(f"{ckpt / file} is corrupted: its checksum is {checksum}, the manifest's "
                              f"{expected} (the bytes changed after the save); resume from another checkpoint")


# what a generic model's transformers config records besides its architecture (where it was read, by what)
NOT_ARCHITECTURE = ("_name_or_path", "transformers_version")


def model_config(trainer_state: dict) -> ModelConfig | GenericConfig:
    saved = trainer_state["model_config"]
    try:
        return GenericConfig(**saved) if "hf_json" in saved else ModelConfig(**saved)
    except TypeError as e:
        raise CheckpointError(f"the checkpoint's model config cannot be read by this horizon-triton: {e}") from e


def train_config(trainer_state: dict) -> TrainConfig:
    saved = dict(trainer_state["train_config"])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(f"the checkpoint's train config has setting(s) {unknown} this horizon-triton does not "
                              "know (written by a newer version?); pass train_cfg= explicitly")
    saved["betas"] = tuple(saved["betas"])
    return TrainConfig(**saved)


def config_differences(saved, current) -> list[str]:
    """'field: checkpoint X, this model Y' for every architecture setting that differs (ModelConfigs: their
    fields; GenericConfigs: their transformers configs' keys)."""
    if type(saved) is not type(current):
        return [f"model family: checkpoint {type(saved).__name__} ({saved.model_type}), this model "
                f"{type(current).__name__} ({current.model_type})"]
    if isinstance(saved, GenericConfig):
        a, b = json.loads(saved.hf_json), json.loads(current.hf_json)
        return [f"{key}: checkpoint {a.get(key)!r}, this model {b.get(key)!r}" for key in sorted(a.keys() | b.keys())
                if key not in NOT_ARCHITECTURE and a.get(key) != b.get(key)]
    return [f"{f.name}: checkpoint {getattr(saved, f.name)!r}, this model {getattr(current, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if f.compare and getattr(saved, f.name) != getattr(current, f.name)]


def _tensor_differences(manifest: dict, expected: dict) -> list[str]:
    """What differs between the checkpoint's tensors and this store's: whole kinds first, then tensors."""
    saved = manifest["tensors"]
    ours, theirs = {t["kind"] for t in expected.values()}, {t["kind"] for t in saved.values()}
    out = []
    if ours - theirs:
        out.append(f"this store has kinds {sorted(ours - theirs)} that the checkpoint lacks")
    if theirs - ours:
        out.append(f"the checkpoint has kinds {sorted(theirs - ours)} that this store lacks")

    def spec(t):
        return f"{t['dtype']} x {t['numel']}"
    shared = ours & theirs
    out += [f"{name}: checkpoint {spec(saved[name])}, this store {spec(expected[name])}"
            for name in expected if name in saved and
            (saved[name]["dtype"], saved[name]["numel"]) != (expected[name]["dtype"], expected[name]["numel"])]
    out += [f"{name} is not in the checkpoint" for name, t in expected.items()
            if name not in saved and t["kind"] in shared]
    out += [f"the checkpoint's {name} has no place in this store" for name, t in saved.items()
            if name not in expected and t["kind"] in shared]
    return out


def load_into(store: HostStore, ckpt: Path, manifest: dict) -> None:
    """Fills the store's state buffers from the checkpoint, after checking that every tensor is there, in the
    layout this store has, in files whose headers agree with the manifest. A shared store: every local rank
    checks and calls this; local rank 0 reads the bytes, the others return once it has (store.fill_shared)."""
    expected = expected_tensors(store)
    differences = _tensor_differences(manifest, expected)
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise CheckpointError(f"{ckpt} does not fit this model's training state: {shown}")
    headers = {}
    for file in {t["file"] for t in manifest["tensors"].values()}:
        header, data_start = read_safetensors_header(ckpt / file)
        headers[file] = (header, data_start)
    for name, t in manifest["tensors"].items():
        header, _ = headers[t["file"]]
        entry, dtype = header.get(name), _DTYPE_NAMES[t["dtype"]]
        begin, end = (entry or {}).get("data_offsets", (0, -1))
        if (entry is None or entry.get("dtype") != SAFETENSORS_DTYPES[dtype] or entry.get("shape") != [t["numel"]]
                or end - begin != t["numel"] * dtype.itemsize):
            raise CheckpointError(f"{ckpt / t['file']}: tensor {name} is missing or differs from the manifest "
                                  f"({entry})")
    def read_bytes():
        for file, (header, data_start) in headers.items():
            checksum = Checksum()
            with open(ckpt / file, "rb", buffering=0) as f:
                checksum.add(f.read(data_start))
                # in file order, so that the checksum covers the bytes as written
                for name, t in sorted(_state_tensors_in(store, file, manifest),
                                      key=lambda item: header[item[0]]["data_offsets"][0]):
                    if f.tell() != data_start + header[name]["data_offsets"][0]:
                        raise CheckpointError(f"{ckpt / file}: tensor {name} does not follow the one before "
                                              "it (not a file this checkpointer wrote)")
                    _read_into(f, t, f"{ckpt / file} ({name})", checksum)
            _verify(ckpt, file, manifest, checksum.value())
    store.fill_shared(read_bytes)


def _state_tensors_in(store: HostStore, file: str, manifest: dict):
    for name, _, _, t in _state_tensors(store):
        if manifest["tensors"][name]["file"] == file:
            yield name, t

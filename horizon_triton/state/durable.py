"""Directories that appear whole or not at all, and stay on disk after a crash.

Everything is written into a temporary sibling ``.NAME.partial-PID-XXXX`` (hidden, named after the process that
owns it), every file and the directory are fsynced, and the directory is put in place with one rename. Over an
existing directory the two are exchanged in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two
renames), so ``NAME`` is at every instant either the old directory or the new one.

The old directory, swapped out, may still hold entries that belong to the new one (a run's training checkpoints
beside its final model): ``keep`` names them, and they are moved into the new directory. A marker file in the
old directory, written before the swap, lists them, so that the next save finishes the move if a kill came
first; temporaries of processes that no longer exist are removed at that point too.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

SWAPPED_OUT = ".swapped-out"     # marker in an old directory: the JSON list of its entries that go to the new one
_TEMP = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)-")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """The directory's entries (new names, renames) reach the disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file and directory under path, bottom-up."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def write_file(path: Path, data: bytes) -> None:
    """A small file, fsynced (its directory is fsynced by whoever renames it into place)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def temp_sibling(dst: Path) -> Path:
    """A fresh hidden temporary directory next to dst, after stale temporaries there were cleaned up."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dst.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)    # mkdtemp's 0700 would make the final directory private
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths; False where the system cannot (then the caller falls back to renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def replace_dir(new: Path, dst: Path, keep=None) -> None:
    """Puts the complete directory ``new`` (a temp_sibling of dst) at ``dst`` as one unit, durably. Entries of
    the old dst that ``keep(name)`` accepts and ``new`` lacks are moved into the new dst; the rest go."""
    fsync_tree(new)
    if not dst.exists():
        os.rename(new, dst)
        fsync_dir(dst.parent)
        return
    moving = [e.name for e in dst.iterdir() if keep is not None and keep(e.name) and not (new / e.name).exists()]
    write_file(dst / SWAPPED_OUT, json.dumps(sorted(moving)).encode())
    fsync_dir(dst)
    if _exchange(new, dst):
        old = new
    else:
        old = new.with_name(new.name + "-old")
        os.rename(dst, old)           # a kill between these two renames is repaired by clean_stale
        os.rename(new, dst)
    fsync_dir(dst.parent)
    _finish(old, dst)


def _finish(old: Path, dst: Path) -> None:
    """Moves the entries the marker lists from the swapped-out ``old`` into ``dst``, then deletes ``old``."""
    for name in json.loads((old / SWAPPED_OUT).read_text() or "[]"):
        if (old / name).exists() and not (dst / name).exists():
            os.rename(old / name, dst / name)
    fsync_dir(dst)
    shutil.rmtree(old)
    fsync_dir(dst.parent)


@contextmanager
def assembled(dst: Path, keep=None):
    """``with assembled(dst, keep) as tmp:`` write the new directory into tmp (a temp_sibling); on leaving, it is
    swapped in at dst as one unit (replace_dir, keeping what ``keep`` names); on an error the temporary goes."""
    tmp = temp_sibling(dst)
    try:
        yield tmp
        replace_dir(tmp, dst, keep=keep)
    except BaseException:
        discard_temp(tmp)
        raise


def discard_temp(tmp: Path) -> None:
    """After a failed save: removes its temporary, unless the swap happened and it now is the marked old
    directory, whose pending move the next save's clean_stale finishes."""
    if not (tmp / SWAPPED_OUT).exists():
        shutil.rmtree(tmp, ignore_errors=True)


def discard_dir(path: Path) -> None:
    """Removes a directory so that no half-deleted copy is ever seen under its name: renamed away first."""
    gone = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
    os.rename(path, gone / path.name)
    fsync_dir(path.parent)
    shutil.rmtree(gone)


def process_alive(pid: int) -> bool:
    """Whether pid is a running process (a zombie, dead but not yet reaped by its parent, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):     # no /proc (not Linux): kill's answer stands
        return True


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False          # our own temporaries outlive no call that made them: leftovers of a failure
    return process_alive(pid)


def clean_stale(parent: Path) -> None:
    """Finishes or removes what killed saves left in ``parent``: a swapped-out directory (marked) hands the
    entries its marker lists to the new one (or becomes NAME again if the kill came between the two fallback
    renames); every other temporary of a dead process is deleted."""
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        match = _TEMP.match(entry.name)
        if match is None or _alive(int(match["pid"])):
            continue
        dst = parent / match["name"]
        marker = entry / SWAPPED_OUT
        if marker.exists() and not dst.exists():
            marker.unlink()
            os.rename(entry, dst)
            fsync_dir(parent)
        elif marker.exists():
            _finish(entry, dst)
        else:
            shutil.rmtree(entry, ignore_errors=True)
    busy = {m["name"] for m in map(_TEMP.match, (e.name for e in parent.iterdir())) if m}   # saves under way
    for entry in parent.iterdir():
        if (entry / SWAPPED_OUT).is_file() and not _TEMP.match(entry.name) and entry.name not in busy:
            (entry / SWAPPED_OUT).unlink()    # killed before its exchange: it is still the current directory

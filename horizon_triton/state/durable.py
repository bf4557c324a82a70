"""Directories that appear whole or not at all, and stay on disk after a crash.

Everything is written into a temporary sibling ``.NAME.partial-PID-XXXX`` (hidden, named after the process that
owns it), every file and the directory are fsynced, and the directory is put in place with one rename. Over an
existing directory the two are exchanged in one step (Linux ``renameat2(RENAME_EXCHANGE)``; elsewhere two
renames), so ``NAME`` is at every instant either the old directory or the new one.

The old directory, swapped out, may still hold entries that belong to the new one (a run's training checkpoints
beside its final model): ``keep`` names them, and they are moved into the new directory. A marker file in the
old directory, written before the swap, lists them, so that the next save finishes the move if a kill came
first; temporaries of processes that no longer exist are removed at that point too.

A mount point (a container's volume) cannot be renamed or swapped (EBUSY, EXDEV). There the new directory is
assembled inside it (``NAME/.NAME.partial-PID-XXXX``) and its entries are swapped in one by one: a journal
(``NAME/.swap-in-place``) listing them is written and fsynced first, each old entry of that name is moved into
a second temporary, each new one renamed into place, the old entries that ``keep`` does not accept moved out
too, then the journal goes. A kill in between leaves the journal, and the next save (or any clean_stale of the
directory) rolls the swap forward to its end: the file set is the old one or, once the journal exists, the new
one, never a mixture that stays.

OS errors of a write name the file (``naming``): a full disk's ENOSPC otherwise comes without one.
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
IN_PLACE = ".swap-in-place"      # journal of a swap of a mount point's entries (JSON: temporaries, entries)
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


@contextmanager
def naming(path):
    """OS errors raised in the block name ``path``: a write's ENOSPC or EFBIG carries no file name, and
    safetensors' writer reports its OS error as text ("... (os error 28)")."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
    except Exception as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(path)) from e


def describe(error: OSError) -> str:
    """One line for an OS error: the path(s), what happened, the errno's name (ENOSPC, EROFS, ...)."""
    name = errno.errorcode.get(error.errno)
    what = error.strerror or str(error)
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    return (f"{paths}: " if paths else "") + what + (f" ({name})" if name else "")


def write_file(path: Path, data: bytes) -> None:
    """A small file, fsynced (its directory is fsynced by whoever renames it into place)."""
    with naming(path), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def is_mount_point(path: Path) -> bool:
    """Whether path is a mount point (a bind mount of a directory of the same file system too: it is listed
    in /proc/self/mountinfo, while os.path.ismount sees the same device as its parent's)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if os.path.ismount(path):
        return True
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]) == real:
                    return True
    except OSError:                   # no /proc (not Linux): os.path.ismount's answer stands
        pass
    return False


def _private_temp(dst: Path, where: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-{os.getpid()}-", dir=where))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)    # mkdtemp's 0700 would make the final directory private
    return tmp


def temp_sibling(dst: Path) -> Path:
    """A fresh hidden temporary directory next to dst, after stale temporaries there were cleaned up; inside dst
    when dst is a mount point (its entries are then swapped in one by one: see the module's docstring)."""
    if is_mount_point(dst):
        clean_stale(dst)
        return _private_temp(dst, dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(dst.parent)
    return _private_temp(dst, dst.parent)


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
    if new.parent == dst:
        _replace_entries(new, dst, keep)
        return
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


def is_internal(name: str) -> bool:
    """Entries of a directory that belong to the saving machinery, never to the saved file set."""
    return name == IN_PLACE or _TEMP.match(name) is not None


def _replace_entries(new: Path, dst: Path, keep) -> None:
    """replace_dir for a mount point dst: ``new`` is inside it; its entries are swapped in under a journal."""
    entries = sorted(e.name for e in new.iterdir())
    going = sorted(e.name for e in dst.iterdir() if not is_internal(e.name) and e.name not in entries
                   and not (keep is not None and keep(e.name)))
    old = _private_temp(dst, dst)
    write_file(dst / IN_PLACE, json.dumps({"new": new.name, "old": old.name, "entries": entries,
                                           "going": going}).encode())
    fsync_dir(dst)
    _finish_in_place(dst)


def _finish_in_place(dst: Path) -> None:
    """Rolls the swap the journal in dst describes forward to its end (idempotent: a kill anywhere in it is
    finished by the next call), then removes the journal and the old entries."""
    journal = json.loads((dst / IN_PLACE).read_text())
    new, old = dst / journal["new"], dst / journal["old"]
    old.mkdir(exist_ok=True)
    for name in journal["entries"]:
        if os.path.lexists(new / name):           # not moved in yet: whatever has its name now is the old one
            if os.path.lexists(dst / name):
                os.rename(dst / name, old / name)
            os.rename(new / name, dst / name)
    for name in journal["going"]:
        if os.path.lexists(dst / name):
            os.rename(dst / name, old / name)
    fsync_dir(dst)
    (dst / IN_PLACE).unlink()
    fsync_dir(dst)
    shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


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
    directory, whose pending move the next save's clean_stale finishes, or an in-place swap of its entries
    began (its journal exists: the next clean_stale of the mount point finishes it)."""
    if (tmp / SWAPPED_OUT).exists():
        return
    journal = tmp.parent / IN_PLACE
    if journal.is_file() and tmp.name in journal.read_text():
        return
    shutil.rmtree(tmp, ignore_errors=True)


def discard_dir(path: Path) -> None:
    """Removes a directory so that no half-deleted copy is ever seen under its name: renamed away first."""
    gone = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
    os.rename(path, gone / path.name)
    fsync_dir(path.parent)
    shutil.rmtree(gone)


def discard_entries(parent: Path, names) -> None:
    """Removes the entries ``names`` of ``parent`` (a mount point too), each renamed away first so that none is
    ever seen half deleted."""
    gone = _private_temp(parent, parent)
    for name in names:
        if os.path.lexists(parent / name):
            os.rename(parent / name, gone / name)
    fsync_dir(parent)
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
    if (parent / IN_PLACE).is_file():            # a mount point whose swap of entries a kill interrupted
        pid = _TEMP.match(json.loads((parent / IN_PLACE).read_text())["new"])["pid"]
        if not _alive(int(pid)):
            _finish_in_place(parent)
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

"""Files that must not be lost or mixed up: writing a file whole or not at all (checkpoints,
results, search indexes), and the lock a process holds on what it writes."""
import contextlib
import fcntl
import json
import os
import secrets
from pathlib import Path

import safetensors.torch

from errors import OutputError, disk_full_message, is_disk_full


@contextlib.contextmanager
def atomic_write(path, mode="wb", sync=True):
    """Write `path` through a temporary file beside it, renamed over it once it is complete and
    on the disk (fsync). os.replace is atomic on POSIX and Windows: a reader, or a process killed
    mid-write (even by kill -9), finds the old file or the new one, never a part of either.

    The temporary name (`.NAME.<random>.tmp`) is new for every write, so two writers of one path
    never share it. On any failure it is removed and `path` is left as it was; an OSError becomes
    OutputError naming the file and, for a full disk, the folder to free. sync=False skips the
    fsync, for a cache that can be made again (thumbnails).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: never write through a file (or a link) that is already there
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(error):
            raise OutputError(f"{path.name} not written: {disk_full_message(error, path.parent)}") from None
        if isinstance(error, OSError):
            raise OutputError(f"{path} cannot be written ({error.strerror or error})") from None
        raise


def write_json(path, data):
    """JSON (UTF-8, indented) written whole or not at all."""
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)


def write_safetensors(path, tensors: dict, metadata=None):
    """Tensors as a safetensors file, written whole or not at all, and readable like every other
    file we write: safetensors' own save_file creates its file with mode 0600 (its owner only)."""
    with atomic_write(path) as f:
        f.write(safetensors.torch.save(tensors, metadata))


def lock(path):
    """An exclusive lock on `path` (a folder, or a file made if it is absent): the descriptor
    that holds it, or None when another process holds it. The lock lasts until the descriptor is
    closed, which the kernel does however the process ends, so a killed process leaves none."""
    path = Path(path)
    flags = os.O_RDONLY if path.is_dir() else os.O_RDWR | os.O_CREAT
    handle = os.open(path, flags | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        return None
    return handle

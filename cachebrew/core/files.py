"""Publishing files so that a crash or Ctrl-C never leaves one that looks complete.

A file is written under a temporary name in its directory, fsynced, then renamed over the final name;
the directory is fsynced too, so the rename itself survives a power cut.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then publish tmp_path as `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; published files get the usual mode
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` for a text file (results.json and the like)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def publish_dir(tmp: Path, final: Path) -> Path:
    """Publish the complete directory `tmp` as `final`: files fsynced, then swapped in by renames.

    `final` is at every moment either the previous complete directory or the new one (the previous one
    is renamed aside first and removed after the swap), never a half-written mix.
    """
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


HASH_CHUNK = 1 << 20


def hash_stream(stream, h=None):
    """Feed a binary stream (a file, a pyarrow input stream) into a sha256 (new unless `h` is given), in chunks."""
    h = h if h is not None else hashlib.sha256()
    while chunk := stream.read(HASH_CHUNK):
        h.update(chunk)
    return h


def sha256_file(path) -> str:
    """The hex sha256 of a local file's bytes: shard checksums, data and tokenizer fingerprints."""
    with open(path, "rb") as f:
        return hash_stream(f).hexdigest()


def unwrap(model):
    """The module inside a DistributedDataParallel / DataParallel wrapper, or the model itself."""
    return model.module if hasattr(model, "module") else model

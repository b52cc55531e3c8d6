"""Durable file-system steps shared by the queue spool and Maildir delivery: write+fsync, group directory fsync.

All file-system calls go through a :class:`FileOps` object so tests can record their order,
inject errors (ENOSPC, EIO) or simulate a crash at any step.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterable, Sequence

_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_REUSED_FILE_FLAGS = os.O_WRONLY | os.O_CLOEXEC
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_space_error(error: OSError) -> bool:
    """True for "no space left" and "quota exceeded"."""
    return error.errno in SPACE_ERRNOS


class FileOps:
    """The file-system primitives the durable writers use (os.* by default)."""

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def writev(self, fd: int, buffers: Sequence[bytes | memoryview]) -> int:
        return os.writev(fd, buffers)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: str) -> None:
        os.unlink(path)


class NoSyncFileOps(FileOps):
    """FileOps without fsync (``[queue] fsync = false``): fast, and not durable across a power loss."""

    def fsync(self, fd: int) -> None:
        pass

    def fsync_dir(self, path: str) -> None:
        pass


def discard(ops: FileOps, path: str) -> None:
    """Unlink ``path`` if it is there, ignoring errors (cleanup after a failure)."""
    with contextlib.suppress(OSError):
        ops.unlink(path)


def write_all(ops: FileOps, fd: int, parts: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write every byte of ``parts`` in order: one write (or writev) call when the kernel takes it all."""
    if len(parts) == 1:
        view = memoryview(parts[0])
        while view:
            view = view[ops.write(fd, view) :]
        return
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        done = ops.writev(fd, views)
        while views and done >= len(views[0]):
            done -= len(views.pop(0))
        if done:
            views[0] = views[0][done:]


def write_new_file(ops: FileOps, path: str, data: bytes | Sequence[bytes], mtime: float = 0.0,
                   reuse: bool = False) -> None:  # fmt: skip
    """Create ``path`` (must not exist), write ``data`` (bytes, or a sequence of parts written with
    writev, no joined copy) and fsync it; with ``mtime``, the file's modification time is set to
    it before the fsync (the queue keeps a message's due time there). ``reuse``: ``path`` is an
    existing file of ours (a spare queue file), overwritten from its start and cut to ``data``'s
    length, so no inode is allocated (nor, up to its old size, any block).

    On an OSError the file is unlinked before the error is re-raised: no partial file remains.
    """
    fd = ops.open(path, _REUSED_FILE_FLAGS if reuse else _NEW_FILE_FLAGS, 0o600)
    try:
        try:
            parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
            write_all(ops, fd, parts)
            if reuse:
                ops.ftruncate(fd, sum(len(p) for p in parts))
            if mtime > 0:
                os.utime(fd, (mtime, mtime))
            ops.fsync(fd)
        finally:
            ops.close(fd)
    except OSError:
        discard(ops, path)
        raise


class _Batch:
    __slots__ = ("dirs", "done", "error")

    def __init__(self) -> None:
        self.dirs: set[str] = set()
        self.done = False
        self.error: OSError | None = None


class DirSyncer:
    """Group commit of directory fsyncs for many threads.

    A thread calling :meth:`sync` adds its directories to the open batch. If no fsync is in
    progress it takes the batch and fsyncs each directory once; otherwise it waits, and the
    next free thread syncs everything that gathered meanwhile. So N concurrent commits cost
    about two directory fsyncs per directory, not N. A failed fsync fails every member of its batch.
    """

    def __init__(self, ops: FileOps) -> None:
        self._ops = ops
        self._cond = threading.Condition(threading.Lock())
        self._open = _Batch()
        self._busy = False
        self.fsyncs = 0  # directory fsyncs done (for measurements)
        self.waiting = 0  # threads waiting for a batch in progress

    def sync(self, dirs: Iterable[str]) -> None:
        """Return once every directory in ``dirs`` was fsynced after this call began."""
        with self._cond:
            batch = self._open
            batch.dirs.update(dirs)
            while not batch.done:
                if self._busy:
                    self.waiting += 1
                    self._cond.wait()
                    self.waiting -= 1
                    continue
                # Nobody is syncing and our batch is not done: it is still the open one. Take it.
                self._busy = True
                self._open = _Batch()
                self._cond.release()
                error: OSError | None = OSError(errno.EIO, "directory fsync interrupted")
                try:
                    for path in sorted(batch.dirs):
                        self._ops.fsync_dir(path)
                        self.fsyncs += 1
                    error = None
                except OSError as e:
                    error = e
                finally:
                    self._cond.acquire()
                    batch.error, batch.done, self._busy = error, True, False
                    self._cond.notify_all()
            if batch.error is not None:
                err = batch.error
                raise OSError(err.errno, err.strerror, err.filename)

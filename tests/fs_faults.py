"""File-system test doubles: FileOps that record every call, and FileOps that fail or crash at one call."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from twisted.python.threadpool import ThreadPool

from pymta.fsio import FileOps


class Crash(Exception):
    """The process dies here: the code under test must not clean up after it."""


class RecordingOps(FileOps):
    """Records ``(op, path)`` for every call, paths relative to ``base``; ``fail(i, op, path)``
    may return an exception to raise instead of (or, for close, after) the i-th call."""

    def __init__(self, base: str, fail: Callable[[int, str, str], BaseException | None] | None = None) -> None:
        self.base = base
        self.calls: list[tuple[str, ...]] = []
        self._fail = fail
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()

    def _step(self, op: str, path: str) -> BaseException | None:
        rel = os.path.relpath(path, self.base)
        with self._lock:
            index = len(self.calls)
            self.calls.append((op, rel))
        return self._fail(index, op, rel) if self._fail else None

    def open(self, path, flags, mode=0o600):
        error = self._step("open", path)
        if error:
            raise error
        fd = super().open(path, flags, mode)
        self._paths[fd] = path
        return fd

    def write(self, fd, data):
        error = self._step("write", self._paths[fd])
        if isinstance(error, Crash):  # torn write: half the bytes reach the file
            super().write(fd, bytes(data[: len(data) // 2]))
        if error:
            raise error
        return super().write(fd, data)

    def writev(self, fd, buffers):
        error = self._step("write", self._paths[fd])
        if isinstance(error, Crash):  # torn write: half the bytes reach the file
            data = b"".join(bytes(b) for b in buffers)
            super().write(fd, data[: len(data) // 2])
        if error:
            raise error
        return super().writev(fd, buffers)

    def pwrite(self, fd, data, offset):
        error = self._step("pwrite", self._paths[fd])
        if isinstance(error, Crash):  # torn write: half the bytes reach the file
            super().pwrite(fd, bytes(data[: len(data) // 2]), offset)
        if error:
            raise error
        return super().pwrite(fd, data, offset)

    def ftruncate(self, fd, length):
        error = self._step("ftruncate", self._paths[fd])
        if error:
            raise error
        super().ftruncate(fd, length)

    def fsync(self, fd):
        error = self._step("fsync", self._paths[fd])
        if error:
            raise error
        super().fsync(fd)

    def close(self, fd):
        error = self._step("close", self._paths.pop(fd))
        super().close(fd)
        if error:
            raise error

    def rename(self, src, dst):
        error = self._step("rename", src)
        if error:
            raise error
        super().rename(src, dst)

    def fsync_dir(self, path):
        error = self._step("fsync_dir", path)
        if error:
            raise error
        super().fsync_dir(path)

    def unlink(self, path):
        error = self._step("unlink", path)
        if error:
            raise error
        super().unlink(path)


def fail_at(step: int, error: BaseException) -> Callable[[int, str, str], BaseException | None]:
    return lambda index, op, path: error if index == step else None


def started_pool(test, maxthreads: int = 8) -> ThreadPool:
    """A started ThreadPool stopped at the end of ``test`` (a trial TestCase)."""
    pool = ThreadPool(minthreads=1, maxthreads=maxthreads, name="test-io")
    pool.start()
    test.addCleanup(pool.stop)
    return pool


def files_under(root: str) -> list[str]:
    """Every file below ``root``, relative, sorted."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        out.extend(os.path.relpath(os.path.join(dirpath, f), root) for f in files)
    return sorted(out)

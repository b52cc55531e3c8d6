"""Listener worker processes: one reactor is one core, so with ``[smtp] processes = N`` the MX
listening sockets are served by N-1 child processes that accept and queue mail (they never
deliver: the main process's queue manager sees their mail through inotify). The main process
holds the sockets but does not accept on them: it delivers, so each side has a core.

Children die with the main process, SIGKILL included (PR_SET_PDEATHSIG), and are started again
if they exit while the main process runs. On a stop the main process closes its copies of the
listening sockets, sends SIGTERM to the children and waits for them (SIGKILL after a bound).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

log = Logger(namespace="pymta.workers")

PARENT_ENV = "PYMTA_PARENT_PID"
PR_SET_PDEATHSIG = 1
FIRST_FD = 3


def listening_socket(interface: str, port: int, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((interface, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def die_with_parent() -> None:
    """In a worker: be signalled when the main process dies, and exit now if it already has."""
    expected = int(os.environ.get(PARENT_ENV, "0") or 0)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if expected and os.getppid() != expected:
        raise SystemExit(0)


class AdoptedPort(service.Service):
    """Serves ``factory`` on an already listening socket (ours, or inherited as a file descriptor)."""

    def __init__(self, reactor: Any, fileno: int, family: int, factory: Any, inherited: bool = False) -> None:
        self.reactor = reactor
        self.fileno = fileno
        self.family = family
        self.factory = factory
        self.inherited = inherited  # an inherited descriptor: close it once adopted (the port has a copy)
        self.port: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        self.port = self.reactor.adoptStreamPort(self.fileno, self.family, self.factory)
        if self.inherited:
            # Otherwise the socket would go on accepting into its backlog after the port stops.
            os.close(self.fileno)

    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        if self.port is not None:
            return self.port.stopListening()
        return None


class _Worker(protocol.ProcessProtocol):
    def __init__(self, owner: WorkerPool, index: int) -> None:
        self.owner = owner
        self.index = index
        self.pid: int | None = None  # kept: the process transport forgets it when the process ends

    def processEnded(self, reason: Any) -> None:
        self.owner.ended(self, reason)


class WorkerPool(service.Service):
    """Starts ``count`` worker processes that inherit the listening sockets."""

    def __init__(
        self, reactor: Any, count: int, config_path: str, sockets: list[socket.socket],
        on_ended: Callable[[int], None] | None = None, stop_limit: float = 8.0,
    ) -> None:  # fmt: skip
        self.reactor = reactor
        self.count = count
        self.config_path = config_path
        self.sockets = sockets
        self.on_ended = on_ended  # called with the pid of a worker that ended (drop what it held)
        self.stop_limit = stop_limit  # seconds the workers get to stop before SIGKILL
        self.processes: dict[int, Any] = {}
        self._all_ended: defer.Deferred[Any] | None = None

    def command(self) -> list[str]:
        logger = [a for a in sys.argv if a.startswith("--logger=")]
        fds = ",".join(f"{FIRST_FD + i}:{s.family.value}" for i, s in enumerate(self.sockets))
        # SIGHUP and SIGUSR1 (passed on by the main process) are ignored until the worker's own
        # handlers are installed: their default action would kill a worker that is still starting.
        start = "import signal; [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGHUP, signal.SIGUSR1)]; "
        return [
            sys.executable, "-c", start + "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", *logger,
            "pymta", "--config", self.config_path, "--worker-fds", fds,
        ]  # fmt: skip

    def spawn(self, index: int) -> None:
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for i, sock in enumerate(self.sockets):
            child_fds[FIRST_FD + i] = sock.fileno()
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        worker = _Worker(self, index)
        self.processes[index] = self.reactor.spawnProcess(
            worker, sys.executable, self.command(), env=env, childFDs=child_fds
        )
        worker.pid = self.processes[index].pid
        log.info("listener worker {index} started, pid {pid}", index=index, pid=self.processes[index].pid)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        for index in range(self.count):
            self.spawn(index)

    def ended(self, worker: _Worker, reason: Any) -> None:
        self.processes.pop(worker.index, None)
        if self.on_ended is not None and worker.pid is not None:
            try:
                self.on_ended(worker.pid)
            except Exception:
                log.failure("cleaning up after listener worker {index} failed", index=worker.index)
        if not self.processes and self._all_ended is not None and not self._all_ended.called:
            self._all_ended.callback(None)
        if self.running:
            log.warn("listener worker {index} ended ({why}); starting it again", index=worker.index,
                     why=reason.getErrorMessage())  # fmt: skip
            self.reactor.callLater(1.0, lambda: self.spawn(worker.index) if self.running else None)

    def signal_all(self, name: str | int) -> None:
        """``name``: "HUP", "TERM", "INT", "KILL" or a signal number (Twisted maps only those names)."""
        for process in list(self.processes.values()):
            with contextlib.suppress(Exception):
                process.signalProcess(name)

    def stopService(self) -> defer.Deferred[Any] | None:
        """SIGTERM to every worker; fires when all have ended (SIGKILL after ``stop_limit``)."""
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated (untyped_calls_exclude misses super())
        for sock in self.sockets:
            sock.close()  # our copy: the workers close theirs as they stop
        if not self.processes:
            return None
        self._all_ended = defer.Deferred()
        self.signal_all("TERM")

        def kill_the_rest() -> None:
            if self.processes:
                log.warn("listener workers {pids} still running after {limit}s: SIGKILL",
                         pids=[p.pid for p in self.processes.values()], limit=self.stop_limit)  # fmt: skip
                self.signal_all("KILL")

        timer = self.reactor.callLater(self.stop_limit, kill_the_rest)
        self._all_ended.addBoth(lambda _: timer.cancel() if timer.active() else None)
        return self._all_ended

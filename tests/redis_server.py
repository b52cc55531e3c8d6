"""Debian's redis-server on a loopback port for the tests: started, killed and restarted by PID."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from tests.mta_process import free_port, wait_for_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def have_redis() -> bool:
    return os.access(REDIS_SERVER, os.X_OK)


class RedisServer:
    """One redis-server without persistence, on 127.0.0.1:``port`` (a free one by default)."""

    def __init__(self, directory: str, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.directory, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_port("127.0.0.1", self.port, seconds=15, proc=self.proc)
        return self

    def send(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def stop(self, signum: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        self.send(signal.SIGCONT)
        self.send(signum)
        self.proc.wait(timeout=10)
        self.proc = None


class RedisTestCase(unittest.TestCase):
    """A redis-server of its own per test (``self.redis``, under ``self.dir``); the cluster states
    in ``self.states`` are stopped and the callables in ``self.closing`` called after it."""

    timeout = 90

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.redis = RedisServer(self.dir).start()
        self.states: list = []
        self.closing: list = []

    @defer.inlineCallbacks
    def tearDown(self):
        for close in self.closing:
            close()
        for state in self.states:
            yield state.stop()
        self.redis.stop()

"""Runs the real ``twistd -n pymta`` on loopback for end-to-end tests, and stops it by its PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, seconds: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"twistd exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {seconds}s")


def _running(pid: int) -> bool:
    """True while the process exists and has not ended (a zombie awaiting its reaper has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], seconds: float = 30.0) -> list[int]:
    """Waits (bounded) for processes to end; the PIDs still running then."""
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            if not _running(pid):
                alive.remove(pid)
        if alive:
            time.sleep(0.05)
    return alive


def port_is_free(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return False
    except OSError:
        return True


class MTAProcess:
    """One ``twistd -n pymta`` process with its own state directory and config."""

    def __init__(
        self,
        workdir: str,
        extra_config: str = "",
        port: int | None = None,
        dns: str | None = None,
        smtp_port: int = 2,
        smtp_extra: str = "",
        relay_from: str = "127.0.0.0/8",
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.env = env or {}  # extra environment for twistd (e.g. libfaketime)
        self.port = port or free_port()
        self.state_dir = os.path.join(workdir, "var")
        self.config_path = os.path.join(workdir, "pymta.toml")
        self.log_path = os.path.join(workdir, "pymta.log.jsonl")
        self.proc: subprocess.Popen | None = None
        with open(self.config_path, "w") as f:
            f.write(
                textwrap.dedent(
                    f"""\
                    hostname = "mx.example.test"
                    state_dir = "{self.state_dir}"
                    [smtp]
                    listen = ["tcp:{self.port}:interface=127.0.0.1"]
                    max_message_size = 1048576
                    {smtp_extra}
                    [domains]
                    local = ["example.test"]
                    mailboxes = ["alice@example.test", "bob@example.test"]
                    relay_from = ["{relay_from}"]
                    [outbound]
                    smtp_port = {smtp_port}
                    """
                )
                + (f'[dns]\nservers = ["{dns}"]\ntimeout = "1s"\n' if dns else "")
                + textwrap.dedent(extra_config)
            )

    def twistd_command(self) -> list[str]:
        return [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "--logger=pymta.log.observer",
            "pymta", "--config", self.config_path,
        ]  # fmt: skip

    def start(self) -> MTAProcess:
        env = dict(os.environ, PYMTA_LOG_FILE=self.log_path, PYTHONPATH=ROOT, **self.env)
        self.stderr = open(os.path.join(self.workdir, "twistd.stderr"), "ab")  # noqa: SIM115 (kept open beyond this block)
        self.proc = subprocess.Popen(
            self.twistd_command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=self.stderr, stderr=self.stderr,
        )  # fmt: skip
        wait_for_port("127.0.0.1", self.port, 60, self.proc)
        # The control socket (pymta-queue) may come up just after the listeners.
        self.wait_for(lambda: os.path.exists(os.path.join(self.state_dir, "control.sock")), 60, "the control socket")
        return self

    def stop(self, sig: int = signal.SIGTERM, seconds: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(seconds)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.stderr.close()
        code = self.proc.returncode
        self.proc = None
        return code

    def log_events(self) -> list[dict]:
        if not os.path.exists(self.log_path):
            return []
        events = []
        with open(self.log_path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    events.append(json.loads(line))
        return events

    def queue_files(self, state: str) -> list[str]:
        """Queue ids in ``state`` (deferred/ is hashed into subdirectories)."""
        path = os.path.join(self.state_dir, "queue", state)
        return sorted(name for _dir, _subdirs, names in os.walk(path) for name in names)

    def queued_message(self, qid: str) -> tuple[dict, bytes] | None:
        """The envelope (as JSON data) and body of a queued message, read from its queue file;
        None if it is not queued (or moved while being looked for: ask again)."""
        from pymta.queue import qfile

        root = os.path.join(self.state_dir, "queue")
        for dirpath, _subdirs, names in os.walk(root):
            if qid in names and os.path.relpath(dirpath, root).split(os.sep)[0] != "tmp":
                try:
                    fd = os.open(os.path.join(dirpath, qid), os.O_RDONLY)
                except FileNotFoundError:
                    return None
                try:
                    meta, body = qfile.read_meta(fd), qfile.read_body(fd)
                finally:
                    os.close(fd)
                return json.loads(meta.records.last), body
        return None

    def maildir_messages(self, address: str) -> list[bytes]:
        local, _, domain = address.lower().rpartition("@")
        new = os.path.join(self.state_dir, "mail", domain, local, "new")
        if not os.path.isdir(new):
            return []
        out = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def children(self) -> list[int]:
        """PIDs of the running MTA's child processes (listener workers), zombies excluded."""
        assert self.proc is not None
        out = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid, stat in (line.split() for line in out.splitlines()) if not stat.startswith("Z")]

    def wait_for(self, predicate, seconds: float = 30.0, what: str = "condition"):
        return wait_until(predicate, seconds, what)


def wait_until(predicate, seconds: float = 30.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something true (returned), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def http_service_config(secret: str, api_port: int, public_port: int, tokens: object) -> str:
    """The ``[feedback]`` and ``[http]`` sections of an MTA that serves the API and the public pages
    (one-click unsubscribe under https://mail.example.test), for ``extra_config``; more ``[http]``
    keys may follow it."""
    return textwrap.dedent(f"""
        [feedback]
        bounce_domain = "bounces.example.test"
        secret = "{secret}"
        unsubscribe = true
        [http]
        listen = ["tcp:{api_port}:interface=127.0.0.1"]
        public_listen = ["tcp:{public_port}:interface=127.0.0.1"]
        public_url = "https://mail.example.test"
        tokens_file = "{tokens}"
        """)  # fmt: skip

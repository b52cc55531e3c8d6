"""``pymta-sendmail`` against the real twistd over its local submission socket: direct invocations
(-t, -f, -F, -i, -bs, -bp, the MTA down), another Unix user recorded as the submitter, Mutt in
batch mode with its default sendmail flags, and ``git send-email --sendmail-cmd``."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile

import pytest

from pymta.admin.sendmail import complete_headers, parse_args, recipients_from_headers
from tests.mta_process import MTAProcess

pytestmark = pytest.mark.timeout(180)

SENDMAIL = [sys.executable, "-c", "from pymta.admin.sendmail import run; run()"]


@pytest.fixture(scope="module")
def mta(tmp_path_factory):
    sockdir = tempfile.mkdtemp(prefix="pymta-sendmail-")
    os.chmod(sockdir, 0o755)  # another local user reaches the socket (mode 0666) too
    socket_path = os.path.join(sockdir, "sendmail.sock")
    mta = MTAProcess(str(tmp_path_factory.mktemp("sendmail")), extra_config=f"""
        [sendmail]
        socket = "{socket_path}"
        """)  # fmt: skip
    mta.socket_path = socket_path
    mta.start()
    mta.wait_for(lambda: os.path.exists(socket_path), what="the sendmail socket")
    yield mta
    mta.stop()
    shutil.rmtree(sockdir, True)


def sendmail(mta, args, message: bytes, socket_path: str | None = None, user: str | None = None, **env):
    environment = dict(os.environ, PYMTA_SENDMAIL_SOCKET=socket_path or mta.socket_path, PYMTA_CONFIG=mta.config_path,
                       **env)  # fmt: skip
    command = [*SENDMAIL, *args]
    if user:
        command = ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups", *command]
    return subprocess.run(command, input=message, capture_output=True, env=environment, timeout=60)


def delivered(mta, address: str, marker: bytes, count: int = 1) -> list[bytes]:
    return mta.wait_for(lambda: [m for m in mta.maildir_messages(address) if marker in m] or None, what=f"{marker!r}")


def test_recipients_on_the_command_line_and_missing_headers_are_added(mta):
    done = sendmail(mta, ["-oi", "alice@example.test"], b"Subject: plain one\n\nline\n.\nafter the dot\n")
    assert done.returncode == 0, done.stderr
    [message] = delivered(mta, "alice@example.test", b"plain one")
    assert b"\n.\nafter the dot\n" in message  # -oi: a lone dot is data
    head = message.split(b"\n\n", 1)[0]
    assert b"From: root@" in head
    assert b"\nDate: " in head
    assert b"\nMessage-ID: <" in head
    assert b"local submission by uid 0 root" in head
    assert b"Received: from " in head
    assert b"(local)" in head


def test_without_i_a_lone_dot_ends_the_message(mta):
    done = sendmail(mta, ["alice@example.test"], b"Subject: dot ends\n\nbefore\n.\nnever sent\n")
    assert done.returncode == 0, done.stderr
    [message] = delivered(mta, "alice@example.test", b"dot ends")
    assert b"before" in message
    assert b"never sent" not in message


def test_t_takes_recipients_from_the_header_and_removes_bcc(mta):
    message = b"To: Alice <alice@example.test>\nBcc: bob@example.test\nSubject: with bcc\n\nhello\n"
    done = sendmail(mta, ["-t", "-i", "-f", "bounces@example.test", "-F", "The Sender"], message)
    assert done.returncode == 0, done.stderr
    for address in ("alice@example.test", "bob@example.test"):
        [got] = delivered(mta, address, b"with bcc")
        assert b"Bcc:" not in got
        assert got.startswith(b"Return-Path: <bounces@example.test>")
        assert b'From: "The Sender" <bounces@example.test>' in got


def test_another_unix_user_is_recorded_as_the_submitter(mta):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as another user")
    done = sendmail(mta, ["-i", "alice@example.test"], b"Subject: from nobody\n\nhi\n", user="nobody")
    assert done.returncode == 0, done.stderr
    [message] = delivered(mta, "alice@example.test", b"from nobody")
    uid = pwd.getpwnam("nobody").pw_uid
    assert f"local submission by uid {uid} nobody".encode() in message
    assert any(e.get("event") == "queued" for e in mta.log_events())


def test_mta_down_is_ex_tempfail(mta, tmp_path):
    done = sendmail(mta, ["-i", "alice@example.test"], b"Subject: x\n\nx\n", socket_path=str(tmp_path / "none.sock"))
    assert done.returncode == 75
    assert b"not available" in done.stderr


def test_refused_recipients_and_no_recipients(mta):
    done = sendmail(mta, ["-i", "nobody@example.test"], b"Subject: x\n\nx\n")
    assert done.returncode == 67
    assert b"nobody@example.test" in done.stderr
    assert sendmail(mta, ["-i"], b"Subject: x\n\nx\n").returncode == 65
    assert sendmail(mta, ["-Y"], b"").returncode == 64


def test_bs_speaks_smtp_on_standard_input_and_output(mta):
    dialogue = (b"EHLO localhost\r\nMAIL FROM:<root@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
                b"Subject: over bs\r\n\r\nhi\r\n.\r\nQUIT\r\n")  # fmt: skip
    done = sendmail(mta, ["-bs"], dialogue)
    assert done.returncode == 0
    assert b"250 2.0.0 Ok: queued as" in done.stdout
    assert done.stdout.rstrip().splitlines()[-1].startswith(b"221")
    delivered(mta, "alice@example.test", b"over bs")


def test_bp_lists_the_queue_and_q_flushes(mta):
    listed = sendmail(mta, ["-bp"], b"")
    assert listed.returncode == 0, listed.stderr
    assert sendmail(mta, ["-q"], b"").returncode == 0


def test_mutt_in_batch_mode(mta, tmp_path):
    mutt = shutil.which("mutt")
    if mutt is None:
        pytest.skip("needs Debian's mutt")
    wrapper = tmp_path / "sendmail"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'from pymta.admin.sendmail import run; run()' \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, HOME=str(tmp_path), PYMTA_SENDMAIL_SOCKET=mta.socket_path)
    # Mutt's default sendmail setting is "/usr/sbin/sendmail -oem -oi": the same flags, our command.
    done = subprocess.run([mutt, "-n", "-F", "/dev/null", "-e", f'set sendmail="{wrapper} -oem -oi"',
                           "-s", "from mutt", "bob@example.test"],
                          input=b"written in mutt\n", capture_output=True, env=env, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    [message] = delivered(mta, "bob@example.test", b"from mutt")
    assert b"written in mutt" in message
    assert b"Subject: from mutt" in message


def test_git_send_email(mta, tmp_path):
    git = shutil.which("git")
    probe = subprocess.run([git, "send-email", "-h"], capture_output=True, timeout=30) if git else None
    if probe is None or b"sendmail-cmd" not in probe.stdout + probe.stderr:
        pytest.skip("needs git send-email (Debian's git-email) with --sendmail-cmd")
    repo = tmp_path / "repo"
    env = dict(os.environ, HOME=str(tmp_path), PYMTA_SENDMAIL_SOCKET=mta.socket_path, GIT_AUTHOR_NAME="Dev",
               GIT_AUTHOR_EMAIL="dev@example.test", GIT_COMMITTER_NAME="Dev", GIT_COMMITTER_EMAIL="dev@example.test")
    subprocess.run([git, "init", "-q", str(repo)], check=True, env=env, timeout=30)
    for n, subject in enumerate(("first", "patch over pymta-sendmail")):
        (repo / "file.txt").write_text(f"version {n}\n.\n")
        subprocess.run([git, "-C", str(repo), "add", "file.txt"], check=True, env=env, timeout=30)
        subprocess.run([git, "-C", str(repo), "commit", "-q", "-m", subject], check=True, env=env, timeout=30)
    command = f"{sys.executable} -c 'from pymta.admin.sendmail import run; run()'"
    done = subprocess.run([git, "-C", str(repo), "send-email", f"--sendmail-cmd={command}", "--to=alice@example.test",
                           "--from=Dev <dev@example.test>", "--envelope-sender=dev@example.test", "--confirm=never", "--no-chain-reply-to", "-1"],
                          capture_output=True, env=env, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    [message] = delivered(mta, "alice@example.test", b"patch over pymta-sendmail")
    assert b"Return-Path: <dev@example.test>" in message
    assert b"\n-version 0\n+version 1\n .\n" in message


def test_option_parsing():
    opts = parse_args(["-oem", "-oi", "-fme@example.test", "-F", "Me", "-t", "-B", "8BITMIME", "--", "-x@example.test"])
    assert (opts["i"], opts["t"], opts["f"], opts["F"], opts["rcpts"]) == (True, True, "me@example.test", "Me", ["-x@example.test"])
    assert parse_args(["-bs"])["mode"] == "s"
    assert parse_args(["-q30m"])["mode"] == "q"


def test_header_helpers():
    rcpts, message = recipients_from_headers(b"To: a@x.test, B <b@x.test>\r\nBcc:\r\n c@x.test\r\nSubject: s\r\n\r\nbody\r\n")
    assert rcpts == ["a@x.test", "b@x.test", "c@x.test"]
    assert message == b"To: a@x.test, B <b@x.test>\r\nSubject: s\r\n\r\nbody\r\n"
    done = complete_headers(b"Subject: s\r\n\r\nbody\r\n", "me@x.test", None, "host.x.test")
    assert done.startswith(b"From: me@x.test\r\nDate: ")
    assert b"Message-ID: <" in done
    assert done.endswith(b"Subject: s\r\n\r\nbody\r\n")

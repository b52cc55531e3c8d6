"""RFC 5321 §4.5.1 through the real twistd: ``RCPT TO:<postmaster>`` without a domain, in any
case, from a client that may not relay, is accepted and lands in the configured mailbox."""

from __future__ import annotations

import smtplib

import pytest

from tests.mta_process import MTAProcess

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("postmaster_key", ["", 'postmaster = "hostmaster@example.test"'])
def test_unqualified_postmaster_is_accepted_from_a_stranger_and_delivered(tmp_path, postmaster_key):
    # relay_from excludes loopback: the test client is a stranger that may not relay.
    mta = MTAProcess(str(tmp_path), relay_from="192.0.2.0/24")
    with open(mta.config_path) as f:
        text = f.read()
    with open(mta.config_path, "w") as f:  # the key belongs in the [domains] table MTAProcess writes
        f.write(text.replace('relay_from = ["192.0.2.0/24"]', f'relay_from = ["192.0.2.0/24"]\n{postmaster_key}'))
    mailbox = "hostmaster@example.test" if postmaster_key else "postmaster@example.test"
    mta.start()
    try:
        with smtplib.SMTP("127.0.0.1", mta.port, timeout=30) as client:
            client.ehlo("client.example")
            for bare in ("postmaster", "PostMaster"):
                assert client.mail("someone@remote.example")[0] == 250
                code, text = client.rcpt(bare)
                assert (code, text[:5]) == (250, b"2.1.5"), text
                assert client.data(f"Subject: to {bare}\r\n\r\nhello\r\n".encode())[0] == 250
            assert client.mail("someone@remote.example")[0] == 250
            code, text = client.rcpt("nobody@remote.example")
            assert (code, text[:5]) == (550, b"5.7.1")  # still not a relay
        messages = mta.wait_for(lambda: len(mta.maildir_messages(mailbox)) == 2 and mta.maildir_messages(mailbox),
                                what="both postmaster messages delivered")  # fmt: skip
        assert sorted(m.split(b"Subject: ")[1].split(b"\n")[0].rstrip() for m in messages) == [b"to PostMaster", b"to postmaster"]
        assert all(b"for <" + mailbox.encode() + b">" in m for m in messages)
    finally:
        mta.stop()

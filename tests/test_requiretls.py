"""REQUIRETLS (RFC 8689) on the receiving side: offered after STARTTLS only, the MAIL parameter
refused in plaintext (530 5.7.10) and kept in the envelope; the TLS-Required header read."""

from __future__ import annotations

from typing import ClassVar

from pymta.envelope import Envelope
from pymta.outbound.requiretls import requiretls_of, tls_optional
from tests.test_smtp_server import Client


def test_requiretls_is_offered_after_starttls_only():
    c = Client(tls=True)
    before = c.send("EHLO client.test\r\n").decode()
    assert "STARTTLS" in before
    assert "REQUIRETLS" not in before
    c.send("STARTTLS\r\n")
    after = c.send("EHLO client.test\r\n").decode()
    assert "250-REQUIRETLS" in after or "250 REQUIRETLS" in after


def test_requiretls_in_plaintext_is_refused_with_5_7_10():
    c = Client(tls=True)
    c.ready()
    assert c.codes("MAIL FROM:<a@b.example> REQUIRETLS\r\n") == ["530 5.7.10"]
    assert not [call for call in c.delegate.calls if call[0] == "mail"]


def test_requiretls_over_tls_is_accepted_and_reaches_the_delegate():
    c = Client(tls=True)
    c.ready()
    c.send("STARTTLS\r\n")
    c.send("EHLO again\r\n")
    assert c.codes("MAIL FROM:<a@b.example> REQUIRETLS\r\n") == ["250 2.1.0"]
    assert c.delegate.calls[-1] == ("mail", "a@b.example", {"REQUIRETLS": ""})
    assert c.codes("RSET\r\n") == ["250 2.0.0"]
    assert c.codes("MAIL FROM:<a@b.example> REQUIRETLS=yes\r\n") == ["555 5.5.4"]


def test_the_tls_required_no_header_is_found_in_the_header_section_only():
    assert tls_optional(b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n")
    assert tls_optional(b"tls-required:no\n\nbody\n")
    assert not tls_optional(b"Subject: x\r\n\r\nTLS-Required: No\r\n")
    assert not tls_optional(b"TLS-Required: Nope\r\n\r\n")
    assert requiretls_of(Envelope("Q", "a@b", [], extra={"requiretls": True}))
    assert not requiretls_of(Envelope("Q", "a@b", []))


def test_a_requiretls_message_no_hop_could_take_bounces_with_5_7_30_after_its_retries():
    from twisted.internet import task

    from pymta.envelope import DEFERRED, ROUTE_LOCAL, ROUTE_RELAY, Recipient, new_qid
    from pymta.queue.manager import QueueManager
    from pymta.queue.store import MemoryQueueStore
    from tests.fakes import ScriptedDeliveryAgent

    clock = task.Clock()
    clock.advance(1_700_000_000)
    waits = (DEFERRED, 451, "4.7.30", "mx.test does not offer REQUIRETLS, which this message requires; not sent")
    class Keeping(ScriptedDeliveryAgent):
        extras: ClassVar[list] = []

        def deliver(self, envelope, recipients, body):
            self.extras.append(dict(envelope.extra))
            return super().deliver(envelope, recipients, body)

    relay = ScriptedDeliveryAgent({"r@far.test": [waits]})
    local = Keeping()
    store = MemoryQueueStore()
    manager = QueueManager(store, {ROUTE_RELAY: relay, ROUTE_LOCAL: local}, clock, "mx.test", retry_initial=60,
                           retry_max=600, max_age=3600, delay_warning=0,
                           route_for=lambda a: ROUTE_LOCAL if a.endswith("@here.test") else ROUTE_RELAY)  # fmt: skip
    manager.startService()
    env = Envelope(qid=new_qid(), sender="s@here.test", arrival=clock.seconds(), extra={"requiretls": True},
                   recipients=[Recipient("r@far.test", route=ROUTE_RELAY)])  # fmt: skip
    store.enqueue(env, b"Subject: secret\r\n\r\nx\r\n")
    manager.notify_incoming(env.qid)
    for _ in range(200):  # bounded: retries until max_age
        clock.advance(60)
        if local.calls:
            break
    assert len(relay.calls) > 1  # retried first
    [(_, rcpts, dsn)] = local.calls
    assert rcpts == ["s@here.test"]
    assert b"Status: 5.7.30" in dsn
    assert b"REQUIRETLS" in dsn
    assert local.extras == [{"dsn_for": env.qid, "action": "failed", "requiretls": True}]  # the notice keeps REQUIRETLS


def test_the_requiretls_parameter_is_kept_in_the_queued_envelope(tmp_path):
    import ipaddress

    from twisted.internet import defer, task

    from pymta.inbound.policy import RelayPolicy
    from pymta.inbound.receiver import InboundReceiver
    from pymta.interfaces import INCOMING
    from pymta.queue.store import MemoryQueueStore
    from tests.sessions import Accepted, Sess, Txn

    store = MemoryQueueStore()
    policy = RelayPolicy(["example.test"], None, [ipaddress.ip_network("127.0.0.0/8")], [], str(tmp_path))
    receiver = InboundReceiver("mx.example.test", policy, store, task.Clock())
    for params, expected in (({"REQUIRETLS": ""}, {"requiretls": True}), ({}, {})):
        session = Sess(tls="TLSv1.3", transaction=Txn(sender="s@example.org", params=params))
        session.transaction.recipients.append(Accepted("r@remote.example"))
        replies: list = []
        defer.maybeDeferred(receiver.message, session, b"Subject: x\r\n\r\nx\r\n").addBoth(replies.append)
        assert replies[0].code == 250
        qid = replies[0].text.rsplit(" ", 1)[-1]
        assert store.load(qid).extra == expected
        assert store.state(qid) == INCOMING

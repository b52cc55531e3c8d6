"""RCPT-stage relay control: local mailboxes, forward domains, relay only from trusted networks."""

from __future__ import annotations

import ipaddress

import pytest

from pymta.envelope import ROUTE_FORWARD, ROUTE_LOCAL, ROUTE_RELAY
from pymta.inbound.policy import RelayPolicy, split_address, unquote_local

TRUSTED = "127.0.0.1"
STRANGER = "192.0.2.7"


def make_policy(tmp_path, mailboxes=("alice@example.test",)):
    return RelayPolicy(
        local_domains=["example.test"],
        mailboxes=mailboxes,
        relay_from=[ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")],
        forward_domains=["corp.example"],
        mail_root=str(tmp_path / "mail"),
    )


@pytest.mark.parametrize(
    "address",
    [
        "user@other.example",
        "USER@OTHER.EXAMPLE",
        "user@other.example.",
        "user%other.example@example.test",
        "user%other.example@EXAMPLE.TEST",
        "other.example!user@example.test",
        '"user@other.example"@example.test',
        '"user%other.example"@example.test',
        "user@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]",
        "user@[127.0.0.1]",
    ],
)
def test_open_relay_attempts_from_a_stranger_are_refused(tmp_path, address):
    decision = make_policy(tmp_path, mailboxes=None).recipient(address, STRANGER)
    assert decision.route is None
    assert decision.reply.code == 550
    assert decision.reply.enhanced in ("5.7.1", "5.1.1")


@pytest.mark.parametrize("address", ["alice@example.test", "Alice@EXAMPLE.TEST", "alice@example.test."])
def test_existing_local_mailbox_is_accepted_in_any_case(tmp_path, address):
    decision = make_policy(tmp_path).recipient(address, STRANGER)
    assert decision.route == ROUTE_LOCAL
    assert decision.reply is None
    assert decision.address.endswith("@example.test")


def test_unknown_local_mailbox_is_550_511(tmp_path):
    decision = make_policy(tmp_path).recipient("bob@example.test", STRANGER)
    assert (decision.reply.code, decision.reply.enhanced) == (550, "5.1.1")


def test_every_local_part_exists_when_mailboxes_is_absent(tmp_path):
    assert make_policy(tmp_path, mailboxes=None).recipient("anyone@example.test", STRANGER).route == ROUTE_LOCAL


@pytest.mark.parametrize("local", ["..", ".hidden", "a/b", '"a/b"', '"../x"', '"a\x01b"', '"a\\\x7fb"'])
def test_unsafe_local_parts_are_refused_with_511(tmp_path, local):
    decision = make_policy(tmp_path, mailboxes=None).recipient(f"{local}@example.test", TRUSTED)
    assert decision.route is None
    assert (decision.reply.code, decision.reply.enhanced) == (550, "5.1.1")


def test_forward_domains_are_accepted_from_anyone(tmp_path):
    assert make_policy(tmp_path).recipient("x@CORP.example", STRANGER).route == ROUTE_FORWARD


def test_trusted_network_and_authenticated_clients_may_relay(tmp_path):
    policy = make_policy(tmp_path)
    assert policy.recipient("user@other.example", TRUSTED).route == ROUTE_RELAY
    assert policy.recipient("user@other.example", "::1").route == ROUTE_RELAY
    assert policy.recipient("user@other.example", "::ffff:127.0.0.5").route == ROUTE_RELAY
    assert policy.recipient("user@other.example", STRANGER, auth_user="app").route == ROUTE_RELAY
    assert policy.recipient("user@other.example", "not-an-ip").route is None


def test_address_splitting_respects_quoted_local_parts():
    assert split_address('"a@b"@Example.Test.') == ('"a@b"', "example.test")
    assert split_address("x@Y.test") == ("x", "y.test")
    assert unquote_local('"a\\"b"') == 'a"b'


def test_feedback_addresses_and_tokens_on_the_bounce_domain_route_to_feedback(tmp_path):
    from pymta.envelope import ROUTE_FEEDBACK

    policy = RelayPolicy(
        ["example.test"], ["alice@example.test"], [], [], str(tmp_path),
        feedback_domains=["bounces.example.test"], feedback_addresses=["fbl@example.test"],
    )  # fmt: skip
    token = "b-0123456789ABCDEFGH-abcdefghijklmnop"
    assert policy.recipient(f"{token}@Bounces.Example.Test", STRANGER).route == ROUTE_FEEDBACK
    assert policy.recipient("u-0123456789ABCDEFGH-abcdefghijklmnop=news.example@bounces.example.test", STRANGER).route == ROUTE_FEEDBACK
    assert policy.recipient("FBL@example.test", STRANGER).route == ROUTE_FEEDBACK
    assert policy.recipient("postmaster@bounces.example.test", STRANGER).reply.enhanced == "5.1.1"


def test_every_return_path_the_tagger_makes_is_taken_on_the_bounce_domain_and_nothing_else(tmp_path):
    from pymta.envelope import ROUTE_FEEDBACK, new_qid
    from pymta.feedback.verp import Tagger

    policy = RelayPolicy(["example.test"], None, [], [], str(tmp_path), feedback_domains=["bounces.example.test"])
    tagger = Tagger("s" * 32, "bounces.example.test")
    qid = new_qid()
    for address in (tagger.return_path(qid, "r@remote.test"),
                    tagger.unsubscribe_address(qid, "r@remote.test", "news.example.test")):  # fmt: skip
        assert policy.recipient(address, STRANGER).route == ROUTE_FEEDBACK, address
    for local in ("b-short-abcdefghijklmnop", f"x-{qid}-abcdefghijklmnop", f"b-{qid}-abcdefghijklmno1"):
        assert policy.recipient(f"{local}@bounces.example.test", STRANGER).reply.enhanced == "5.1.1", local


@pytest.mark.parametrize("bare", ["postmaster", "Postmaster", "POSTMASTER", "pOsTmAsTeR"])
def test_unqualified_postmaster_from_anyone_goes_to_the_configured_mailbox(tmp_path, bare):
    policy = RelayPolicy(["example.test"], ["alice@example.test"], [], [], str(tmp_path),
                         postmaster="postmaster@example.test")  # fmt: skip
    decision = policy.recipient(bare, STRANGER)
    assert (decision.route, decision.reply, decision.address) == (ROUTE_LOCAL, None, "postmaster@example.test")


def test_postmaster_of_every_local_domain_reaches_the_configured_mailbox_even_without_a_listed_mailbox(tmp_path):
    policy = RelayPolicy(["example.test", "other.test"], ["alice@example.test"], [], [], str(tmp_path),
                         postmaster="hostmaster@example.test")  # fmt: skip
    for address in ("postmaster@example.test", "PostMaster@Other.Test", "hostmaster@example.test"):
        decision = policy.recipient(address, STRANGER)
        assert (decision.route, decision.address) == (ROUTE_LOCAL, "hostmaster@example.test"), address
    assert policy.recipient("postmaster@elsewhere.example", STRANGER).reply.enhanced == "5.7.1"  # still no relay
    assert policy.recipient("nobody@example.test", STRANGER).reply.enhanced == "5.1.1"


def test_postmaster_at_our_own_host_name_is_the_postmaster_too(tmp_path):
    policy = RelayPolicy(["example.test"], ["alice@example.test"], [], [], str(tmp_path),
                         postmaster="postmaster@example.test", hostname="MX.example.test")  # fmt: skip
    decision = policy.recipient("PostMaster@mx.example.test.", STRANGER)
    assert (decision.route, decision.address) == (ROUTE_LOCAL, "postmaster@example.test")
    assert policy.recipient("alice@mx.example.test", STRANGER).reply.enhanced == "5.7.1"


def test_a_remote_postmaster_address_is_relayed_for_a_bare_postmaster_only(tmp_path):
    policy = RelayPolicy(["example.test"], None, [], [], str(tmp_path), postmaster="noc@isp.example")
    decision = policy.recipient("postmaster", STRANGER)
    assert (decision.route, decision.address) == (ROUTE_RELAY, "noc@isp.example")
    assert policy.recipient("noc@isp.example", STRANGER).reply.enhanced == "5.7.1"


def test_without_a_postmaster_the_bare_name_is_a_syntax_error(tmp_path):
    policy = RelayPolicy(["example.test"], None, [], [], str(tmp_path))
    assert policy.recipient("postmaster", STRANGER).reply.code == 501

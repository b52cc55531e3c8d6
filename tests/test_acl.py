"""ACLs: each matcher and action, first match wins, config errors name the rule."""

from __future__ import annotations

import pytest

from pymta.config import ConfigError, build_config
from pymta.inbound.acl import AclPolicy
from tests.sessions import Sess, Txn


def policy_from(toml_acl: dict) -> AclPolicy:
    return AclPolicy(build_config({"acl": toml_acl}, "t.toml").acl)


def test_client_cidr_reject_with_configured_reply():
    policy = policy_from({"rcpt": [{"client": ["192.0.2.0/24"], "action": "reject", "reply": "550 5.7.1 Not from there"}]})
    reply = policy.check("rcpt", Sess(peer_address="192.0.2.9"), recipient="a@b.test")
    assert (reply.code, reply.enhanced, reply.text) == (550, "5.7.1", "Not from there")
    assert policy.check("rcpt", Sess(peer_address="198.51.100.1"), recipient="a@b.test") is None


def test_a_single_string_is_a_one_element_list():
    policy = policy_from({"connect": [{"client": "192.0.2.0/24", "action": "reject"}]})
    assert policy.check("connect", Sess(peer_address="192.0.2.1")).code == 550


def test_first_match_wins_and_accept_skips_later_rules():
    policy = policy_from(
        {
            "mail": [
                {"sender": "@good.example", "action": "accept"},
                {"sender": "/.*/", "action": "tempfail"},
            ]
        }
    )
    assert policy.check("mail", Sess(), sender="x@good.example") is None
    reply = policy.check("mail", Sess(), sender="x@other.example")
    assert (reply.code, reply.enhanced) == (450, "4.7.1")


def test_continue_goes_on_to_the_next_rule():
    policy = policy_from({"helo": [{"helo": "/./", "action": "continue"}, {"helo": ".bad.example", "action": "reject"}]})
    assert policy.check("helo", Sess(helo_name="host.bad.example")).code == 550
    assert policy.check("helo", Sess(helo_name="host.good.example")) is None


@pytest.mark.parametrize(
    ("rule", "session", "details", "matches"),
    [
        ({"rdns": ".dynamic.example"}, Sess(notes={"client_name": "1-2-3.dynamic.example"}), {}, True),
        ({"rdns": "unknown"}, Sess(), {}, True),
        ({"auth": True}, Sess(auth_user="app"), {}, True),
        ({"auth": True}, Sess(), {}, False),
        ({"auth": False}, Sess(), {}, True),
        ({"auth": ["app", "web"]}, Sess(auth_user="web"), {}, True),
        ({"auth": ["app"]}, Sess(auth_user="web"), {}, False),
        ({"tls": True}, Sess(tls="TLSv1.3"), {}, True),
        ({"tls": False}, Sess(tls="TLSv1.3"), {}, False),
        ({"sender": "<>"}, Sess(), {"sender": ""}, True),
        ({"sender": "Boss@Example.Test"}, Sess(), {"sender": "boss@example.test"}, True),
        ({"sender": "@example.test"}, Sess(transaction=Txn(sender="a@example.test")), {}, True),
        ({"recipient": "/^abuse@/"}, Sess(), {"recipient": "abuse@x.test"}, True),
        ({"recipient": "@x.test"}, Sess(), {"recipients": ["a@y.test", "b@x.test"]}, True),
        ({"recipient": "@x.test"}, Sess(), {"recipients": ["a@y.test"]}, False),
        ({"size": 1000}, Sess(), {"size": 1001}, True),
        ({"size": 1000}, Sess(), {"size": 1000}, False),
        ({"client": "::1/128"}, Sess(peer_address="::1"), {}, True),
        ({"client": "127.0.0.0/8"}, Sess(peer_address="::ffff:127.0.0.1"), {}, True),
    ],
)
def test_each_matcher(rule, session, details, matches):
    policy = policy_from({"data": [dict(rule, action="reject")]})
    assert (policy.check("data", session, **details) is not None) == matches


@pytest.mark.parametrize(
    ("acl", "key"),
    [
        ({"rcpt": [{"action": "explode"}]}, "acl.rcpt[1].action"),
        ({"rcpt": [{"action": "reject", "reply": "450 4.7.1 later"}]}, "acl.rcpt[1].reply"),
        ({"rcpt": [{"action": "reject", "reply": "550 no enhanced code"}]}, "acl.rcpt[1].reply"),
        ({"rcpt": [{"action": "reject", "color": "red"}]}, "acl.rcpt[1].color"),
        ({"rcpt": [{"client": "300.1.1.1/8", "action": "reject"}]}, "acl.rcpt[1].client"),
        ({"mail": [{"sender": "/(/", "action": "reject"}]}, "acl.mail[1].sender"),
        ({"helo": [{"recipient": "a@b", "action": "reject"}]}, "acl.helo[1].recipient"),
        ({"queue": []}, "acl.queue"),
    ],
)
def test_bad_rules_are_config_errors_naming_the_rule(acl, key):
    with pytest.raises(ConfigError) as info:
        build_config({"acl": acl}, "t.toml")
    assert str(info.value).startswith(f"t.toml: {key}")

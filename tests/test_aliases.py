"""Aliases file, [virtual] table, recipient delimiter and SRS at the RCPT stage (RelayPolicy)."""

from __future__ import annotations

import ipaddress
import os

import pytest
from twisted.internet import task

from pymta.config import ConfigError, load_config
from pymta.envelope import ROUTE_FORWARD, ROUTE_LOCAL, ROUTE_RELAY
from pymta.inbound.aliases import AliasTables, TableError, expand, parse_aliases
from pymta.inbound.policy import RelayPolicy
from pymta.inbound.srs import SRS, SRSError

STRANGER = "192.0.2.7"
SECRET = "a-secret-of-twenty-chars"
DAY = 86400.0


def write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def make_policy(tmp_path, aliases: str = "", virtual=None, mailboxes=("alice@example.test", "carol@example.test"),
                delimiter="+", srs=None, clock=None, **kw) -> RelayPolicy:  # fmt: skip
    path = write(tmp_path / "aliases", aliases) if aliases else None
    return RelayPolicy(
        ["example.test"], mailboxes, [ipaddress.ip_network("127.0.0.0/8")], ["fwd.test"], str(tmp_path / "mail"),
        postmaster="postmaster@example.test" if "postmaster@example.test" in (mailboxes or ()) else "carol@example.test",
        tables=AliasTables(path, virtual or {}), srs=srs, delimiter=delimiter, clock=clock, **kw,
    )  # fmt: skip


def targets(decision) -> list[tuple[str, str | None]]:
    return [(t.address, t.route if t.route else t.reply.enhanced) for t in decision.deliveries()]


# -- the aliases file -----------------------------------------------------------------------


def test_aliases_file_with_comments_continuations_quotes_and_include(tmp_path):
    write(tmp_path / "team.list", "# members\nalice\nbob@remote.test, \\carol\n")
    path = write(tmp_path / "aliases", (
        "# the aliases\n"
        "Sales: alice, bob@remote.test,\n"
        "\tcarol\n"
        "\n"
        '"quoted": alice\n'
        "team: :include:team.list\n"
    ))  # fmt: skip
    assert parse_aliases(path) == {
        "sales": ("alice", "bob@remote.test", "carol"),
        "quoted": ("alice",),
        "team": ("alice", "bob@remote.test", "\\carol"),
    }


@pytest.mark.parametrize(("text", "line", "reason"), [
    ("a: alice\nno colon here\n", 2, "expected \"name: target, target\""),
    ("a: alice\nA: bob\n", 2, "defined twice (first on line 1)"),
    ("\n  continued\n", 2, "continuation line"),
    ("a: |/usr/bin/procmail\n", 1, "pipes to commands are not supported"),
    ("a: /var/mail/a\n", 1, "delivery into files is not supported"),
    ("a:\n", 1, "no target"),
    ("a: alice, bad address\n", 1, "not an address"),
    ("a: bob@\n", 1, "not an address"),
])  # fmt: skip
def test_a_malformed_aliases_file_is_one_line_naming_file_and_line(tmp_path, text, line, reason):
    path = write(tmp_path / "aliases", text)
    with pytest.raises(TableError) as e:
        parse_aliases(path)
    message = str(e.value)
    assert message.startswith(f"{path}:{line}: ")
    assert reason in message
    assert "\n" not in message


def test_an_error_in_an_included_file_names_that_file(tmp_path):
    write(tmp_path / "inc", "alice\n|cmd\n")
    path = write(tmp_path / "aliases", "a: :include:inc\n")
    with pytest.raises(TableError, match=rf"^{tmp_path}/inc:2: a: pipes"):
        parse_aliases(path)


def test_a_malformed_virtual_table_is_a_startup_error_naming_file_and_line(tmp_path):
    config = write(tmp_path / "pymta.toml", (
        '[domains]\nlocal = ["example.test"]\n'
        "[virtual]\n"
        '"sales@example.test" = ["alice@example.test"]\n'
        '"info@example.test" = ["not an address"]\n'
    ))  # fmt: skip
    with pytest.raises(ConfigError, match=rf"^{config}:5: virtual.info@example.test: item 1: not a"):
        load_config(config)
    write(tmp_path / "pymta.toml", '[virtual]\n"no-at-sign" = "alice@example.test"\n')
    with pytest.raises(ConfigError, match=r":2: virtual.no-at-sign: a key is"):
        load_config(config)


# -- expansion ------------------------------------------------------------------------------


def test_expansion_is_recursive_deduplicated_and_keeps_the_tables_order():
    table = {"a@x.test": ("b@x.test", "c@x.test"), "b@x.test": ("d@x.test", "c@x.test")}
    expansion = expand("a@x.test", table.get)
    assert [a for a, _ in expansion.finals] == ["d@x.test", "c@x.test"]
    assert all(via for _, via in expansion.finals)
    assert expansion.failures == ()


def test_a_loop_fails_its_branch_with_546_and_never_loops():
    table = {"a@x.test": ("b@x.test", "ok@x.test"), "b@x.test": ("a@x.test",)}
    expansion = expand("a@x.test", table.get)
    assert [a for a, _ in expansion.finals] == ["ok@x.test"]
    assert [(a, r.code, r.enhanced) for a, r in expansion.failures] == [("a@x.test", 550, "5.4.6")]


def test_nesting_past_the_depth_limit_fails_546_and_a_huge_expansion_is_refused():
    chain = {f"a{i}@x.test": (f"a{i + 1}@x.test",) for i in range(50)}
    expansion = expand("a0@x.test", chain.get, max_depth=5)
    assert expansion.finals == ()
    assert expansion.failures[0][1].enhanced == "5.4.6"
    wide = {"all@x.test": tuple(f"u{i}@x.test" for i in range(50))}
    assert expand("all@x.test", wide.get, max_expansion=10).refused.enhanced == "5.5.3"


# -- the policy: what a recipient becomes -----------------------------------------------------


def test_an_alias_expands_to_local_mailboxes_and_forwarded_remote_addresses(tmp_path):
    policy = make_policy(tmp_path, "sales: alice, bob@remote.test, carol\n")
    decision = policy.recipient("Sales@Example.Test", STRANGER)  # a stranger: aliases are ours, not relaying
    assert decision.reply is None
    assert targets(decision) == [("alice@example.test", ROUTE_LOCAL), ("bob@remote.test", ROUTE_RELAY),
                                 ("carol@example.test", ROUTE_LOCAL)]  # fmt: skip
    assert [t.forwarded for t in decision.deliveries()] == [False, True, False]


def test_an_alias_loop_refuses_the_recipient_546(tmp_path):
    policy = make_policy(tmp_path, "loop1: loop2\nloop2: loop1\n")
    reply = policy.recipient("loop1@example.test", STRANGER).reply
    assert (reply.code, reply.enhanced) == (550, "5.4.6")


def test_an_alias_naming_itself_means_its_own_mailbox_too(tmp_path):
    policy = make_policy(tmp_path, "alice: alice, carol\n")
    assert targets(policy.recipient("alice@example.test", STRANGER)) == [
        ("alice@example.test", ROUTE_LOCAL), ("carol@example.test", ROUTE_LOCAL)]  # fmt: skip
    policy = make_policy(tmp_path, "alice: \\alice, carol\nbob: alice\n")
    assert targets(policy.recipient("bob@example.test", STRANGER)) == [
        ("alice@example.test", ROUTE_LOCAL), ("carol@example.test", ROUTE_LOCAL)]  # fmt: skip
    policy = make_policy(tmp_path, "alice: \\alice, carol\ncarol: alice\n")  # carol -> alice -> carol: a loop
    assert targets(policy.recipient("carol@example.test", STRANGER)) == [
        ("alice@example.test", ROUTE_LOCAL), ("carol@example.test", "5.4.6")]  # fmt: skip


def test_an_unknown_member_is_bounced_alone_and_an_alias_of_only_unknowns_is_refused(tmp_path):
    policy = make_policy(tmp_path, "list: alice, gone\nempty: gone\n")
    assert targets(policy.recipient("list@example.test", STRANGER)) == [
        ("alice@example.test", ROUTE_LOCAL), ("gone@example.test", "5.1.1")]  # fmt: skip
    assert policy.recipient("empty@example.test", STRANGER).reply.enhanced == "5.1.1"


def test_virtual_entries_user_at_domain_user_at_and_catch_all(tmp_path):
    virtual = {
        "sales@example.test": ("alice@example.test", "bob@remote.test"),
        "help@": ("carol@example.test",),
        "@old.test": ("alice@example.test",),
        "@example.test": ("carol@example.test",),
        "info@fwd.test": ("alice@example.test",),
    }
    policy = make_policy(tmp_path, virtual=virtual)
    assert targets(policy.recipient("sales@example.test", STRANGER)) == [
        ("alice@example.test", ROUTE_LOCAL), ("bob@remote.test", ROUTE_RELAY)]  # fmt: skip
    assert targets(policy.recipient("help@example.test", STRANGER)) == [("carol@example.test", ROUTE_LOCAL)]
    assert targets(policy.recipient("anyone@old.test", STRANGER)) == [("alice@example.test", ROUTE_LOCAL)]
    # the catch-all takes only what no mailbox or alias takes
    assert targets(policy.recipient("alice@example.test", STRANGER)) == [("alice@example.test", ROUTE_LOCAL)]
    assert targets(policy.recipient("nobody@example.test", STRANGER)) == [("carol@example.test", ROUTE_LOCAL)]
    assert targets(policy.recipient("info@fwd.test", STRANGER)) == [("alice@example.test", ROUTE_LOCAL)]
    assert policy.recipient("other@fwd.test", STRANGER).route == ROUTE_FORWARD
    assert policy.recipient("x@remote.test", STRANGER).reply.enhanced == "5.7.1"  # still no open relay


def test_a_virtual_alias_domain_without_a_catch_all_refuses_unknown_users(tmp_path):
    policy = make_policy(tmp_path, virtual={"info@virt.test": ("alice@example.test",)})
    assert policy.recipient("info@virt.test", STRANGER).route == ROUTE_LOCAL
    assert policy.recipient("other@virt.test", "127.0.0.1").reply.enhanced == "5.1.1"


def test_role_names_reach_the_configured_postmaster_unless_they_exist(tmp_path):
    policy = make_policy(tmp_path, "abuse: alice\ncarol: carol, bob@remote.test\n")
    assert targets(policy.recipient("postmaster", STRANGER)) == [  # the postmaster address is an alias too
        ("carol@example.test", ROUTE_LOCAL), ("bob@remote.test", ROUTE_RELAY)]  # fmt: skip
    policy = make_policy(tmp_path, "abuse: alice\n")
    assert targets(policy.recipient("MAILER-DAEMON@example.test", STRANGER)) == [("carol@example.test", ROUTE_LOCAL)]
    assert targets(policy.recipient("abuse@example.test", STRANGER)) == [("alice@example.test", ROUTE_LOCAL)]
    assert targets(policy.recipient("postmaster@example.test", STRANGER)) == [("carol@example.test", ROUTE_LOCAL)]


# -- recipient delimiter --------------------------------------------------------------------


def test_the_delimiter_accepts_an_extension_when_the_mailbox_exists(tmp_path):
    policy = make_policy(tmp_path)
    decision = policy.recipient("alice+news@example.test", STRANGER)
    assert (decision.route, decision.address, decision.reply) == (ROUTE_LOCAL, "alice+news@example.test", None)
    assert policy.recipient("nobody+news@example.test", STRANGER).reply.enhanced == "5.1.1"
    assert make_policy(tmp_path, delimiter="").recipient("alice+news@example.test", STRANGER).reply.enhanced == "5.1.1"


def test_the_full_address_wins_over_the_stripped_one_and_extensions_follow_local_aliases(tmp_path):
    policy = make_policy(tmp_path, "sales: alice, bob@remote.test\nsales+vip: carol\n")
    assert targets(policy.recipient("sales+vip@example.test", STRANGER)) == [("carol@example.test", ROUTE_LOCAL)]
    assert targets(policy.recipient("sales+q3@example.test", STRANGER)) == [
        ("alice+q3@example.test", ROUTE_LOCAL), ("bob@remote.test", ROUTE_RELAY)]  # fmt: skip


# -- SRS ------------------------------------------------------------------------------------


def test_srs_rewrites_and_reverses_the_sender():
    srs = SRS(SECRET, "MX.Example.Test")
    now = 1_700_000_000.0
    rewritten = srs.forward("Bob@Origin.Test", now)
    assert rewritten.startswith("SRS0=")
    assert rewritten.endswith("=origin.test=Bob@mx.example.test")
    assert srs.reverse(rewritten, now + 3 * DAY) == "Bob@origin.test"
    assert srs.reverse(rewritten.upper().replace("@MX.EXAMPLE.TEST", "@mx.example.test"), now) == "BOB@ORIGIN.TEST"
    assert srs.forward("", now) == ""
    assert srs.forward("x@mx.example.test", now) == "x@mx.example.test"


def test_srs_refuses_forged_and_expired_addresses():
    srs = SRS(SECRET, "mx.example.test")
    now = 1_700_000_000.0
    rewritten = srs.forward("bob@origin.test", now)
    forged = rewritten.replace("=origin.test=", "=victim.test=")
    with pytest.raises(SRSError, match="signature"):
        srs.reverse(forged, now)
    with pytest.raises(SRSError, match="expired"):
        srs.reverse(rewritten, now + 30 * DAY)
    with pytest.raises(SRSError, match="signature"):
        SRS("another-secret-of-20-chars", "mx.example.test").reverse(rewritten, now)


def test_srs1_wraps_another_forwarders_address_and_unwraps_to_it():
    first = SRS("first-forwarder-secret!", "fwd1.test")
    ours = SRS(SECRET, "mx.example.test")
    now = 1_700_000_000.0
    srs0 = first.forward("bob@origin.test", now)
    srs1 = ours.forward(srs0, now)
    assert srs1.startswith("SRS1=")
    assert "=fwd1.test==" in srs1
    assert ours.reverse(srs1, now) == srs0
    assert ours.forward(srs1.replace("mx.example.test", "fwd2.test"), now).startswith("SRS1=")
    assert first.reverse(ours.reverse(srs1, now), now) == "bob@origin.test"


def test_a_bounce_to_an_srs_address_goes_to_the_original_sender_and_a_forged_one_is_refused(tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    srs = SRS(SECRET, "mx.example.test")
    policy = make_policy(tmp_path, srs=srs, clock=clock)
    remote = srs.forward("bob@origin.test", clock.seconds())
    decision = policy.recipient(remote, STRANGER)  # from anyone: a bounce is not relaying
    assert targets(decision) == [("bob@origin.test", ROUTE_RELAY)]
    assert not decision.deliveries()[0].forwarded
    assert policy.forward_sender("alice@example.test", clock.seconds()) == "alice@example.test"  # ours: as it is
    assert policy.forward_sender("", clock.seconds()) == ""
    assert targets(policy.recipient(srs.forward("carol@fwd.test", clock.seconds()), STRANGER)) == [
        ("carol@fwd.test", ROUTE_FORWARD)]  # fmt: skip
    forged = remote.replace("=origin.test=", "=victim.test=")
    reply = policy.recipient(forged, STRANGER).reply
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    assert "SRS" in reply.text
    clock.advance(30 * DAY)
    assert policy.recipient(remote, STRANGER).reply.enhanced == "5.7.1"


# -- reload ---------------------------------------------------------------------------------


def test_reload_reads_the_tables_again_and_keeps_the_old_ones_on_error(tmp_path):
    path = write(tmp_path / "aliases", "sales: alice\n")
    virtual = [{"a@example.test": ("alice@example.test",)}]
    tables = AliasTables(path, virtual[0], lambda: virtual[0])
    write(tmp_path / "aliases", "sales: carol\n")
    virtual[0] = {"b@example.test": ("carol@example.test",)}
    assert tables.reload()
    assert tables.aliases == {"sales": ("carol",)}
    assert list(tables.virtual) == ["b@example.test"]
    write(tmp_path / "aliases", "broken\n")
    assert not tables.reload()
    assert tables.aliases == {"sales": ("carol",)}
    os.remove(path)
    assert not tables.reload()

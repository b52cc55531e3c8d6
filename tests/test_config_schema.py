"""The configuration schema: every key of every section is checked and named in its one-line error;
lists, tables and arrays of tables nest; the first error in the file's order is the one reported."""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

from pymta.config import Config, ConfigError, build_config

Wrap = Callable[[Any], Any]


def _probes(cls: type, wrap: Wrap, prefix: str) -> Iterator[tuple[Any, str]]:
    """(document, key) pairs: ``key`` set to a list of an empty list (a form no key takes) in every section."""
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        if not field.metadata.get("toml", True):
            continue
        key = f"{prefix}.{field.name}" if prefix else field.name
        yield wrap({field.name: [[]]}), key
        t, origin, args = hints[field.name], typing.get_origin(hints[field.name]), typing.get_args(hints[field.name])
        if attrs.has(t):
            yield from _probes(t, lambda d, w=wrap, n=field.name: w({n: d}), key)
        elif origin is tuple and attrs.has(args[0]):
            yield from _probes(args[0], lambda d, w=wrap, n=field.name: w({n: [d]}), f"{key}[1]")
        elif origin is dict and attrs.has(args[1]):
            yield from _probes(args[1], lambda d, w=wrap, n=field.name: w({n: {"n": d}}), f"{key}.n")
        elif origin is dict and typing.get_origin(args[1]) is tuple and attrs.has(typing.get_args(args[1])[0]):
            inner = typing.get_args(args[1])[0]
            yield from _probes(inner, lambda d, w=wrap, n=field.name: w({n: {"data": [d]}}), f"{key}.data[1]")


PROBES = list(_probes(Config, lambda d: d, ""))


def test_the_probes_reach_nested_sections():
    keys = {key for _, key in PROBES}
    assert {"smtp.listen", "shaping.domain.n.window", "shaping.backoff[1].rate", "scan.milter[1].socket",
            "acl.data[1].spf", "webhooks[1].events", "dkim.n.selector", "sources.n.warmup"} <= keys  # fmt: skip
    assert len(keys) > 200


@pytest.mark.parametrize(("document", "key"), PROBES, ids=[key for _, key in PROBES])
def test_every_key_rejects_a_value_of_the_wrong_form_naming_itself(document, key):
    with pytest.raises(ConfigError) as info:
        build_config(document, "t.toml")
    message = str(info.value)
    assert re.match(rf"t\.toml: {re.escape(key)}(: |\[1\]: )", message), message
    assert "\n" not in message, message


def test_unknown_keys_are_named_wherever_they_are():
    for document, key in [({"sources": {"a": {"adress": "x"}}}, "sources.a.adress"),
                          ({"shaping": {"backoff": [{"match": "x", "paws": "1m"}]}}, "shaping.backoff[1].paws"),
                          ({"acl": {"rcpt": [{"colour": "red"}]}}, "acl.rcpt[1].colour")]:  # fmt: skip
        with pytest.raises(ConfigError) as info:
            build_config(document, "t")
        assert str(info.value).startswith(f"t: {key}: unknown key (known: "), str(info.value)


def test_the_first_bad_key_in_the_file_is_the_one_reported():
    with pytest.raises(ConfigError, match=r"^t: smtp\.max_recipients: "):
        build_config({"smtp": {"max_recipients": 0, "max_errors": 0}}, "t")
    with pytest.raises(ConfigError, match=r"^t: smtp\.max_errors: "):
        build_config({"smtp": {"max_errors": 0, "max_recipients": 0}}, "t")


def test_lists_tables_and_arrays_of_tables_nest_with_their_positions():
    ladder = {"address": "127.0.0.2", "warmup_start": "2026-01-01", "warmup_provider": {"g": [10, 0]}}
    with pytest.raises(ConfigError, match=r"^t: sources\.a\.warmup_provider: g: item 2: must be at least 1, got 0$"):
        build_config({"sources": {"a": ladder}}, "t")
    with pytest.raises(ConfigError, match=r"^t: acl: expected arrays of tables \[\[acl\.NAME\]\]$"):
        build_config({"acl": 5}, "t")
    with pytest.raises(ConfigError, match=r"^t: webhooks: expected an array of tables \[\[webhooks\]\]$"):
        build_config({"webhooks": {}}, "t")
    with pytest.raises(ConfigError, match=r"^t: pools: expected tables \[pools\.NAME\]$"):
        build_config({"pools": 5}, "t")
    with pytest.raises(ConfigError, match=r"^t: routes: a\.test: bad port in 'x:0'$"):
        build_config({"routes": {"a.test": "x:0"}}, "t")


def test_one_value_stands_for_a_list_of_one_except_a_warmup_ladder():
    config = build_config({"domains": {"local": "A.Test."}, "smtp": {"listen": "tcp:25"}})
    assert config.domains.local == ("a.test",)
    assert config.smtp.listen == ("tcp:25",)
    with pytest.raises(ConfigError, match=r"^t: sources\.a\.warmup: expected a list, got integer$"):
        build_config({"sources": {"a": {"address": "127.0.0.2", "warmup": 5}}}, "t")


def test_values_take_their_forms_and_defaults_hold():
    config = build_config({"queue": {"retry_initial": "2m", "min_free": "1MB"}, "shaping": {"domain": {"X.Test": {}}},
                           "dkim": {"Example.ORG": {"selector": "s", "key": "k.pem"}}}, "t")  # fmt: skip
    assert (config.queue.retry_initial, config.queue.min_free, config.queue.retry_max) == (120, 1 << 20, 4 * 3600)
    assert list(config.shaping.domain) == ["x.test"]
    assert config.dkim["example.org"].domain == "example.org"
    assert config.path == "t"
    assert build_config({}).limits.message_rate == build_config({"limits": {}}).limits.message_rate is not None

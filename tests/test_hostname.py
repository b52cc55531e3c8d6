"""One host-name rule for the configuration, DNS lookups and the SMTP address grammar."""

from __future__ import annotations

import re

import pytest

from pymta.config import ConfigError, build_config
from pymta.dns import DNSPermanentError, to_ascii
from pymta.hostname import DOMAIN, ascii_hostname
from pymta.smtp.syntax import parse_path


def test_names_come_out_as_lower_case_a_labels_without_the_trailing_dot():
    assert ascii_hostname(" Mail.Example.ORG. ") == "mail.example.org"
    assert ascii_hostname("bücher.example") == "xn--bcher-kva.example"


@pytest.mark.parametrize("bad", ["", ".", "a..b", "-a.example", "a-.example", "a_b.example", "a" * 64 + ".example",
                                 ("a" * 60 + ".") * 5, "sp ace.example", "\u0000.example"])  # fmt: skip
def test_malformed_names_are_refused_with_the_name_given(bad):
    with pytest.raises(ValueError, match="not a valid host or domain name"):
        ascii_hostname(bad)


def test_service_labels_pass_only_where_dns_owner_names_are_meant():
    assert ascii_hostname("_smtp._tls.example.org", underscores=True) == "_smtp._tls.example.org"
    assert to_ascii("_mta-sts.Example.org") == "_mta-sts.example.org"
    with pytest.raises(DNSPermanentError):
        to_ascii("bad..name.test")


def test_the_configuration_and_the_smtp_grammar_use_the_same_rule():
    with pytest.raises(ConfigError, match=r"not a valid host or domain name 'bad_host\.example'"):
        build_config({"domains": {"local": ["bad_host.example"]}})
    assert build_config({"domains": {"local": ["Good.Example."]}}).domains.local == ("good.example",)
    assert re.fullmatch(DOMAIN, "mx1.example.org.")
    assert parse_path("<a@MX1.Example.org.>") == "a@mx1.example.org"
    with pytest.raises(ValueError):
        parse_path("<a@-bad.example>")

"""Configuration: the shipped file loads; every error is one line naming file, key and reason."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import textwrap

import pytest

from pymta.config import ConfigError, load_config, parse_duration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "etc", "pymta.toml")


def write(tmp_path, text: str) -> str:
    path = tmp_path / "pymta.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_shipped_config_loads_with_the_documented_keys():
    config = load_config(SHIPPED)
    assert config.hostname == "mx.example.test"
    assert config.smtp.listen == ("tcp:2525:interface=127.0.0.1",)
    assert config.smtp.max_message_size == 36700160
    assert config.smtp.max_recipients == 1000
    assert config.domains.local == ("example.test",)
    assert "alice@example.test" in config.domains.mailboxes
    assert ipaddress.ip_network("127.0.0.0/8") in config.domains.relay_from
    assert config.queue.retry_initial == 300
    assert config.queue.max_age == 5 * 86400


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("4h", 14400), ("5d", 432000), ("1w", 604800), ("250ms", 0.25), (12, 12)],
)
def test_durations_are_strings_with_units(text, seconds):
    assert parse_duration(text) == seconds


def test_relative_state_dir_resolves_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, 'state_dir = "spool"\n'))
    assert config.state_dir == str(tmp_path / "spool")
    assert config.queue_dir == str(tmp_path / "spool" / "queue")


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("bogus = 1\n", "bogus", "unknown key"),
        ("[smtp]\nlisen = []\n", "smtp.lisen", "unknown key"),
        ("[smtp]\nmax_recipients = \"many\"\n", "smtp.max_recipients", "expected an integer"),
        ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients", "at least 1"),
        ("[smtp]\nlisten = [\"carrier-pigeon\"]\n", "smtp.listen", "endpoint"),
        ("[smtp]\ncommand_timeout = \"soon\"\n", "smtp.command_timeout", "duration"),
        ("[domains]\nrelay_from = [\"10.0.0.0/33\"]\n", "domains.relay_from", "CIDR"),
        ("[domains]\nlocal = [\"bad domain\"]\n", "domains.local", "host or domain name"),
        ("[domains]\nlocal = [\"a.test\"]\nmailboxes = [\"x@b.test\"]\n", "domains.mailboxes", "not in a domains.local"),
        ("[queue]\nretry_initial = \"1h\"\nretry_max = \"5m\"\n", "queue.retry_max", "shorter"),
        ("[outbound]\nsmarthost = \"relay:99999\"\n", "outbound.smarthost", "bad port"),
        ("[routes]\n\"example.org\" = 25\n", "routes", "expected a string"),
        ("hostname = 7\n", "hostname", "expected a string"),
        ("smtp = 3\n", "smtp", "expected a table"),
        ("[smtp\n", "TOML", "syntax"),
    ],
)
def test_bad_values_name_file_key_and_reason(tmp_path, text, key, reason):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(path + ": ")
    assert key in message
    assert reason in message
    assert "\n" not in message


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "nope.toml"))


def test_twistd_refuses_a_bad_config_with_one_line_and_no_traceback(tmp_path):
    path = write(tmp_path, "[smtp]\nmax_recipients = -1\n")
    proc = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "pymta", "--config", path],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"pymta: configuration error: {path}: smtp.max_recipients: must be at least 1, got -1"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "Usage" not in proc.stdout


def test_config_defaults_to_the_environment_variable(tmp_path, monkeypatch):
    from pymta.config import default_config_path

    monkeypatch.setenv("PYMTA_CONFIG", "/x/y.toml")
    assert default_config_path() == "/x/y.toml"
    monkeypatch.delenv("PYMTA_CONFIG")
    assert default_config_path() == "/etc/pymta/pymta.toml"


def test_outbound_timeouts_reach_every_client_stage(tmp_path):
    from dataclasses import fields

    from pymta.config import CLIENT_TIMEOUT_STAGES
    from pymta.smtp.client import ClientTimeouts
    from pymta.tap import client_timeouts

    assert set(CLIENT_TIMEOUT_STAGES) == {f.name for f in fields(ClientTimeouts)}
    config = load_config(write(tmp_path, """
        [outbound]
        timeouts = { greeting = "2m", data_block = "90s", data_end = "10m", connect = "20s" }
        """))
    timeouts = client_timeouts(config.outbound)
    assert (timeouts.greeting, timeouts.data_block, timeouts.data_end, timeouts.connect) == (120, 90, 600, 20)
    assert timeouts.rcpt == ClientTimeouts().rcpt == 300  # RFC 5321 defaults for the rest
    assert client_timeouts(load_config(write(tmp_path, "[outbound]\nconnect_timeout = \"7s\"\n")).outbound).connect == 7


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('timeouts = { data_blok = "1m" }', "data_blok: must be one of connect, greeting"),
        ('timeouts = { data_end = "soon" }', "data_end: expected a duration"),
        ('timeouts = { mail = "0s" }', "mail: must be at least 1s"),
        ('connect_timeout = "5s"\ntimeouts = { connect = "6s" }', "connect: also set as outbound.connect_timeout"),
    ],
)
def test_bad_outbound_timeouts_name_the_stage(tmp_path, text, reason):
    path = write(tmp_path, "[outbound]\n" + text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: outbound.timeouts: ")
    assert reason in str(info.value)


def test_mta_sts_is_on_by_default_and_can_be_turned_off(tmp_path):
    assert load_config(write(tmp_path, "")).outbound.mta_sts is True
    assert load_config(write(tmp_path, "[outbound]\nmta_sts = false\n")).outbound.mta_sts is False
    with pytest.raises(ConfigError, match=r"outbound\.mta_sts: expected true or false"):
        load_config(write(tmp_path, "[outbound]\nmta_sts = \"yes\"\n"))


def test_postmaster_defaults_to_the_first_local_domain_and_can_be_set():
    from pymta.config import build_config

    assert build_config({"domains": {"local": ["a.test", "b.test"]}}).postmaster == "postmaster@a.test"
    assert build_config({"hostname": "mx.c.test"}).postmaster == "postmaster@mx.c.test"
    config = build_config({"domains": {"local": ["a.test"], "postmaster": "Noc@A.Test"}})
    assert config.postmaster == "Noc@a.test"
    with pytest.raises(ConfigError, match=r"domains\.postmaster: not a mail address"):
        build_config({"domains": {"postmaster": "nobody"}})


def test_sender_login_is_any_or_strict():
    from pymta.config import build_config

    assert build_config({}).submission.sender_login == "any"
    assert build_config({"submission": {"sender_login": "strict"}}).submission.sender_login == "strict"
    with pytest.raises(ConfigError, match=r"submission\.sender_login: must be one of any, strict"):
        build_config({"submission": {"sender_login": "loose"}})


def test_session_limits_and_min_free_take_sizes_rates_and_durations(tmp_path):
    config = load_config(write(tmp_path, """\
        [smtp]
        min_data_rate = "2KB/s"
        max_session_time = "10m"
        [queue]
        min_free = "100MB"
        """))  # fmt: skip
    assert config.smtp.min_data_rate == 2048
    assert config.smtp.max_session_time == 600
    assert config.queue.min_free == 100 * 1024 * 1024
    defaults = load_config(write(tmp_path, ""))
    assert defaults.smtp.min_data_rate == 1024
    assert defaults.smtp.max_session_time == 1800
    assert load_config(write(tmp_path, "[smtp]\nmin_data_rate = \"60KB/min\"\n")).smtp.min_data_rate == 1024
    assert load_config(write(tmp_path, "[smtp]\nmin_data_rate = 0\n")).smtp.min_data_rate == 0
    assert load_config(write(tmp_path, "[smtp]\nmin_data_rate = 512\n")).smtp.min_data_rate == 512


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[smtp]\nmin_data_rate = \"fast\"\n", "smtp.min_data_rate", "data rate like"),
        ("[smtp]\nmin_data_rate = \"1KB/fortnight\"\n", "smtp.min_data_rate", "data rate like"),
        ("[smtp]\nmin_data_rate = -1\n", "smtp.min_data_rate", "data rate like"),
        ("[smtp]\nmax_session_time = \"forever\"\n", "smtp.max_session_time", "duration"),
        ("[queue]\nmin_free = \"lots\"\n", "queue.min_free", "size like"),
        ("[queue]\nmin_free = -5\n", "queue.min_free", "negative"),
    ],
)
def test_bad_session_limits_name_file_key_and_reason(tmp_path, text, key, reason):
    test_bad_values_name_file_key_and_reason(tmp_path, text, key, reason)

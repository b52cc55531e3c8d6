"""Reply and returned-mail wordings are data (pymta/wordings.toml), checked like the bounce rules."""

from __future__ import annotations

import pytest

from pymta.outbound.shaping import DEFAULT_BACKOFF, Limits, Shaper
from pymta.queue.manager import is_greylisting
from pymta.wordings import WORDINGS_PATH, load_wordings, wordings


def test_the_shipped_wordings_load_and_pass_the_linear_time_check():
    shipped = load_wordings(WORDINGS_PATH)
    assert len(shipped.backoff) == 3
    assert len(shipped.feedback) == 8
    assert wordings() is wordings()  # loaded once
    assert [r.match.pattern for r in DEFAULT_BACKOFF] == [b.match.pattern for b in shipped.backoff]


@pytest.mark.parametrize(("section", "text"), [
    ("greylisting = 'try again.*later'", "greylisting"),
    ("greylisting = 'x'\n[[backoff]]\nmatch = 'rate (limit)+'\npause = 1\nshare = 0.5\nrecover = 1", "backoff 1"),
    ("greylisting = 'x'\n[feedback]\nchallenge = '(a{0,50}){0,50}'", "feedback.challenge"),
])  # fmt: skip
def test_a_wordings_file_with_a_backtracking_pattern_is_refused_naming_it(tmp_path, section, text):
    path = tmp_path / "wordings.toml"
    path.write_text(section + "\n")
    with pytest.raises(ValueError, match=f"{path}: {text}: "):
        load_wordings(str(path))


@pytest.mark.parametrize(("code", "text", "greylisted"), [
    (451, "4.7.1 Greylisted, please try again in 300 seconds", True),
    (450, "4.2.0 <a@b.test>: Recipient address rejected: Greylisted for 5 minutes", True),
    (451, "4.7.1 Temporarily deferred, retry later", True),
    (451, "4.3.0 Mailbox temporarily unavailable", False),
    (550, "5.7.1 greylisted", False),  # not a 45x reply
])  # fmt: skip
def test_greylisting_is_told_by_code_and_wording(code, text, greylisted):
    assert is_greylisting({"code": code, "text": text}) is greylisted


def test_shipped_pushback_wordings_pause_a_destination_and_others_do_not():
    from twisted.internet import task

    shaper = Shaper(task.Clock(), Limits(connections=2))
    assert shaper.observe("domain:a.test", 421, "4.7.0", "421 4.7.0 Our system has detected an unusual rate of mail")
    assert shaper.observe("domain:b.test", 451, "4.7.28", "451 4.7.28 rate limited, try again later")
    assert not shaper.observe("domain:c.test", 450, "4.2.2", "450 4.2.2 Mailbox full")

"""Messages the injection API builds, read back with the stdlib parser: headers that need RFC 2047
encoding or folding, text that needs quoted-printable, attachments with RFC 2231 names, and
multipart boundaries that leave every part's content exactly as rendered."""

from __future__ import annotations

import base64
import email
import email.policy

import pytest
from twisted.internet import task

from pymta.admin.http.inject import MessageBuilder


def _build(content: dict, rcpt: str = "ann@example.test", name: str = "", variables: dict | None = None):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    raw = MessageBuilder(content, 1 << 20, clock).build(rcpt, name, variables or {})
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(map(len, raw.split(b"\r\n"))) <= 998
    return raw, email.message_from_bytes(raw, policy=email.policy.default)


def _text(msg, subtype: str) -> str:
    return msg.get_body((subtype,)).get_content().replace("\r\n", "\n")  # the wire's line ends


LONG = "word " * 60 + "end"  # one line of 303 characters
CASES = {
    "ascii": ("Hello {{ n }}", "Hi {{ n }}\n.dot\n", "<p>{{ n }}</p>", {"n": "Ann"}),
    "utf-8 and long lines": ("Grüße {{ n }} " + "x" * 90, "Zoë\n" + LONG + "\ntrailing space  \n",
                             "<p>" + LONG + " ü</p>", {"n": "Zoë"}),
    "CRLF line ends, no html": ("re: {{ n }}", "a\r\nb\r\n", None, {"n": "x"}),
    "no trailing newline": ("s", "last line without newline", "<b>x</b>", {}),
}


@pytest.mark.parametrize("case", CASES)
def test_a_built_message_reads_back_as_rendered(case):
    subject, text, html, variables = CASES[case]
    content = {"from": {"email": "news@example.org", "name": "News Ünited"}, "reply_to": "help@example.org",
               "subject": subject, "text_body": text, "headers": {"X-Campaign": "dec"}}  # fmt: skip
    if html is not None:
        content["html_body"] = html
    raw, msg = _build(content, "bob@example.test", "Bob Bäcker", variables)
    rendered = {k: v.replace("{{ n }}", variables.get("n", "")) for k, v in (("subject", subject), ("text", text),
                                                                           ("html", html or ""))}  # fmt: skip
    assert str(msg["Subject"]) == " ".join(rendered["subject"].split())
    assert msg["To"].addresses[0].display_name == "Bob Bäcker"
    assert msg["To"].addresses[0].addr_spec == "bob@example.test"
    assert msg["From"].addresses[0].display_name == "News Ünited"
    assert msg["Reply-To"] == "help@example.org"
    assert msg["X-Campaign"] == "dec"
    assert msg["Message-ID"]
    assert msg["Date"].datetime.timestamp() == 1_800_000_000
    expected_text = rendered["text"].replace("\r\n", "\n")
    expected_text += "" if expected_text.endswith("\n") else "\n"
    assert _text(msg, "plain") == expected_text
    if html is not None:
        assert msg.get_content_type() == "multipart/alternative"
        assert _text(msg, "html") == rendered["html"] + "\n"
    assert raw.isascii() or b"Content-Transfer-Encoding: 8bit" in raw  # 8-bit octets only in 8bit parts


def test_html_only_and_attachments_with_non_ascii_names():
    data = bytes(range(256)) * 4
    _raw, msg = _build({
        "from": "news@example.org", "subject": "s", "html_body": "<p>x</p>",
        "attachments": [{"file_name": "Bericht ä.pdf", "content_type": "application/pdf",
                         "data": base64.b64encode(data).decode()},
                        {"file_name": "b.txt", "content_type": "text/plain", "data": base64.b64encode(b"hi").decode()}],
    })  # fmt: skip
    assert msg.get_content_type() == "multipart/mixed"
    assert _text(msg, "html") == "<p>x</p>\n"
    first, second = msg.iter_attachments()
    assert first.get_filename() == "Bericht ä.pdf"
    assert first.get_content() == data
    assert second.get_filename() == "b.txt"
    assert second.get_content() == "hi"
    boundaries = {p.get_boundary() for p in msg.walk() if p.is_multipart()}
    assert len(boundaries) == 1
    assert all(b.encode() not in data for b in boundaries)


def test_each_message_gets_its_own_message_id_and_boundaries():
    content = {"from": "news@example.org", "subject": "s", "text_body": "t", "html_body": "h"}
    _, a = _build(content)
    _, b = _build(content)
    assert a["Message-ID"] != b["Message-ID"]
    assert a.get_boundary() != b.get_boundary()

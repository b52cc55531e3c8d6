"""Open and click tracking: the rewrite of tricky HTML, what is left alone, signed tokens, and
DKIM signatures made after the rewrite still verifying."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from email.policy import SMTP
from types import SimpleNamespace

import pytest

from pymta.events.tracking import (
    CLICK,
    OPEN,
    Tracker,
    TrackingTokens,
    is_machine,
    rewrite_html,
    rewrite_message,
)

URL = "https://mail.example.test"
TOKENS = TrackingTokens("tracking-secret-0123456789")


def click(url: str) -> str:
    return f"CLICK[{url}]"


def test_uppercase_tags_unquoted_attributes_and_base_href():
    html = ('<HTML><HEAD><BASE HREF="https://shop.example/dir/"></HEAD><BODY>\n'
            '<A HREF=https://a.example/x?a=1&amp;b=2 CLASS=big>one</A>\n'
            "<a href='rel/page.html'>rel</a> <AREA SHAPE=rect HREF=\"/root\">\n"
            "</BODY></HTML>")  # fmt: skip
    out = rewrite_html(html, click, "PIXEL")
    assert '<A HREF="CLICK[https://a.example/x?a=1&amp;b=2]" CLASS=big>' in out  # entity decoded once, re-escaped
    assert 'href="CLICK[https://shop.example/dir/rel/page.html]"' in out
    assert 'HREF="CLICK[https://shop.example/root]"' in out
    assert out.index('<img src="PIXEL"') < out.index("</BODY>")


def test_comments_anchors_mailto_and_other_schemes_are_left_alone():
    html = ('<body><!-- <a href="https://hidden.example/">x</a> --><a href="#top">top</a>'
            '<a href="mailto:help@shop.example">m</a><a href="tel:+1555">t</a><a href="javascript:x()">j</a>'
            '<a href="relative/without/base">r</a><a name="top">anchor</a></body>')  # fmt: skip
    out = rewrite_html(html, click, None)
    assert out == html


def test_no_closing_body_puts_the_pixel_at_the_end():
    out = rewrite_html('<p>hello <a href="http://x.example/">x</a>', click, "PIXEL")
    assert out.endswith('<img src="PIXEL" width="1" height="1" alt="" style="display:block;border:0;width:1px;height:1px" />')
    assert 'href="CLICK[http://x.example/]"' in out


@pytest.mark.parametrize("html", ["<p>broken <a href='https://x.example/", "<p>open comment <!-- <a href=http://x>"])
def test_malformed_html_is_left_unchanged(html):
    assert rewrite_html(html, click, "PIXEL") is None
    message = _message(html)
    assert rewrite_message(message, TOKENS, URL, "Q1", "r@b.example", True, True) == message


def test_tokens_sign_qid_recipient_and_url_for_one_kind():
    token = TOKENS.make(CLICK, "Q1", "r@b.example", "https://shop.example/")
    assert TOKENS.parse(CLICK, token) == ("Q1", "r@b.example", "https://shop.example/")
    assert TOKENS.parse(OPEN, token) is None  # an open token is not a click token
    assert TrackingTokens("another-secret-0123456789").parse(CLICK, token) is None
    data, mac = token.split(".")
    assert TOKENS.parse(CLICK, data[:-2] + ("AA" if data[-2:] != "AA" else "BB") + "." + mac) is None
    assert TOKENS.parse(CLICK, "x" * 5000) is None
    assert TOKENS.parse(CLICK, "no-dot") is None


def test_proxy_fetchers_are_machines():
    assert is_machine("Mozilla/5.0")  # Apple Mail Privacy Protection
    assert is_machine("Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)")
    assert is_machine("")
    assert not is_machine("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_0) AppleWebKit/605.1.15 (KHTML, like Gecko)")


def _message(html: str, text: str = "see https://shop.example/sale") -> bytes:
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "news@shop.example"
    msg["To"] = "r@b.example"
    msg["Subject"] = "Sale"
    msg["List-Unsubscribe"] = "<https://shop.example/unsub?u=1>, <mailto:unsub@shop.example>"
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    return msg.as_bytes(policy=SMTP)


def test_message_rewrite_touches_only_the_html_part():
    original = _message('<html><body><a href="https://shop.example/sale">Sale</a> caf\u00e9</body></html>')
    out = rewrite_message(original, TOKENS, URL, "Q1", "r@b.example", True, True)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert out.partition(b"\r\n\r\n")[0] == original.partition(b"\r\n\r\n")[0]  # headers byte for byte
    assert "https://shop.example/unsub?u=1" in parsed["List-Unsubscribe"]
    before = email.message_from_bytes(original, policy=email.policy.default)
    assert parsed.get_body(("plain",)).as_bytes() == before.get_body(("plain",)).as_bytes()
    html = parsed.get_body(("html",)).get_content()
    [token] = re.findall(r'href="https://mail\.example\.test/t/c/([^"]+)"', html)
    assert TOKENS.parse(CLICK, token) == ("Q1", "r@b.example", "https://shop.example/sale")
    [pixel] = re.findall(r'src="https://mail\.example\.test/t/o/([^"]+)\.gif"', html)
    assert TOKENS.parse(OPEN, pixel) == ("Q1", "r@b.example", "")
    assert "caf\u00e9" in html
    assert out.endswith(b"\r\n")
    assert b"\r\n\r\n" in out
    assert all(len(line) <= 998 for line in out.split(b"\r\n"))


def test_campaigns_and_request_flags_choose_what_is_tracked():
    config = SimpleNamespace(opens=True, clicks=True, campaigns=("dec",))
    tracker = Tracker(config, URL + "/", "tracking-secret-0123456789")
    assert tracker.wanted("dec", None) == (True, True)
    assert tracker.wanted("nov", None) == (False, False)
    assert tracker.wanted("nov", {"clicks": True}) == (False, True)
    assert tracker.wanted("dec", {"opens": False}) == (False, True)
    envelope = SimpleNamespace(qid="Q1", extra={"campaign": "nov"}, recipients=[SimpleNamespace(address="r@b.example")])
    data = _message('<a href="https://shop.example/">x</a>')
    assert tracker(data, envelope) == data


def test_dkim_signed_after_the_rewrite_verifies():
    dkim = pytest.importorskip("dkim")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())  # fmt: skip
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    import base64

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dns(name, timeout=5):
        return record if name == b"sel._domainkey.shop.example." else None

    original = _message('<HTML><BODY><A HREF=https://shop.example/sale>Sale</A></BODY></HTML>')
    rewritten = rewrite_message(original, TOKENS, URL, "Q1", "r@b.example", True, True)
    assert rewritten != original
    signature = dkim.sign(rewritten, b"sel", b"shop.example", private, include_headers=[b"from", b"to", b"subject"])
    assert dkim.verify(signature + rewritten, dnsfunc=dns)
    # Signing first and rewriting after would break the signature: the rewrite must come first.
    early = dkim.sign(original, b"sel", b"shop.example", private, include_headers=[b"from", b"to", b"subject"])
    assert not dkim.verify(rewrite_message(early + original, TOKENS, URL, "Q1", "r@b.example", True, True), dnsfunc=dns)

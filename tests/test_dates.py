"""Header dates: the same text the stdlib writes, right across second boundaries (the cache keeps
the last second only), in both zones."""

from __future__ import annotations

from email.utils import formatdate, parsedate_to_datetime

from pymta.dates import header_date


def test_header_dates_are_the_stdlib_text_for_every_second_and_zone():
    start = 1_764_633_600.25  # 2025-12-02 00:00:00.25 UTC
    for step in (0.0, 0.5, 0.74, 1.0, 1.9, 59.0, 3600.0, 86_399.99, 0.0):
        for localtime in (False, True):
            when = start + step
            assert header_date(when, localtime) == formatdate(int(when), localtime=localtime)
    assert header_date(start).endswith("-0000")
    assert parsedate_to_datetime(header_date(start + 61)).timestamp() == int(start) + 61

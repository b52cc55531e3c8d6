"""``pymta-feedback parse FILE...``: one JSON object per file on standard output.

A file that cannot be read gets one line on standard error and makes the exit status 1 (the
other files are still parsed); a message that is no bounce or complaint is reported as such.

Needs no configuration (``--config`` is accepted and ignored by ``parse``).
"""

from __future__ import annotations

import argparse
import json
import sys

from pymta.feedback.parse import Report, parse_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pymta-feedback", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="accepted for symmetry; parse needs no configuration")
    sub = parser.add_subparsers(dest="command", required=True)
    parse = sub.add_parser("parse", help="parse bounce, complaint and reply messages")
    parse.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    out = sys.stdout
    status = 0
    for path in args.files:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            sys.stderr.write(f"pymta-feedback: cannot read {path}: {e.strerror or e}\n")
            status = 1
            continue
        try:
            report = parse_message(raw)
        except ValueError:
            report = Report()
        out.write(json.dumps(report.as_json(path), ensure_ascii=False) + "\n")
    out.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())

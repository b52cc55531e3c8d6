#!/usr/bin/env python3
"""Per-reason confusion (truth x predicted) of a feedback parse over a corpus with truth.jsonl.

    python3 bench/feedback_confusion.py TRUTH.jsonl PREDICTIONS.jsonl [--list]

Rows are the truth's reason, columns what was predicted; only messages whose truth has a reason
count. ``--list`` also prints every disagreeing file (reason, hard/soft, recipients) so the next
rule to write is the one that fixes the most of them.
"""

from __future__ import annotations

import argparse
import collections
import json


def load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as fp:
        return [json.loads(line) for line in fp if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("truth")
    ap.add_argument("predictions")
    ap.add_argument("--list", action="store_true", help="print every disagreeing file")
    a = ap.parse_args()
    truth = load(a.truth)
    preds = {p["file"]: p for p in load(a.predictions)}
    matrix: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    columns: collections.Counter = collections.Counter()
    for t in truth:
        if not t.get("reason"):
            continue
        got = str(preds.get(t["file"], {}).get("reason"))
        matrix[t["reason"]][got] += 1
        columns[got] += 1
    cols = [c for c, _ in columns.most_common()]
    width = 7  # names cut to 7 characters keep every column distinct
    print("truth \\ predicted".ljust(18) + "".join(c[:width].rjust(width + 1) for c in cols) + "    ok/n")
    for reason in sorted(matrix, key=lambda r: -sum(matrix[r].values())):
        row = matrix[reason]
        cells = "".join((str(row[c]) if row[c] else ".").rjust(width + 1) for c in cols)
        print(reason[:18].ljust(18) + cells + f"  {row[reason]:3d}/{sum(row.values())}")
    if not a.list:
        return
    print()
    for t in truth:
        p = preds.get(t["file"], {})
        want = sorted(t.get("recipients") or [])
        got = sorted(p.get("recipients") or [])
        bad = []
        if t.get("reason") and p.get("reason") != t["reason"]:
            bad.append(f"reason {t['reason']}->{p.get('reason')}")
        if t.get("hard") is not None and p.get("hard") != t["hard"]:
            bad.append(f"hard {t['hard']}->{p.get('hard')}")
        if t.get("recipients") is not None and t.get("action") in ("failed", "delayed", None) and set(want) != set(got):
            bad.append(f"rcpt -{sorted(set(want) - set(got))} +{sorted(set(got) - set(want))}")
        if t.get("action") in ("complaint", "autoreply") and p.get("action") != t["action"]:
            bad.append(f"action {t['action']}->{p.get('action')}")
        if bad:
            print(f"{t['file']}: {'; '.join(bad)}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Print pymta vs Postfix figures from a results.jsonl of the shared harness, with ratios.

  ratios.py RESULTS.jsonl KEY   (KEY: accept_mps or e2e_mps; CPU per 1000 messages is shown too)
Labels are NAME/s=SIZE/c=CONC[/reuse]; pymta rows are paired with postfix rows of the same size/conc.
Several lines of one label (one per round, when the two MTAs take turns) are merged: the figures
are medians over all their runs, and "per round" is the median of the ratios of the runs made in
the same round (the k-th run of each), which a drift of the machine during the bench moves less.
"""

import json
import statistics
import sys


def merged_runs(path: str, key: str) -> dict[tuple[str, str], list[dict]]:
    """(peer name, config) -> every counted run with a ``key`` figure, over all lines of its label
    (bench/dkim_cost.py and bench/webhooks.py read results the same way)."""
    runs: dict[tuple[str, str], list[dict]] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            name, _, config = record["label"].partition("/")
            runs.setdefault((name, config), []).extend(r for r in record["runs"] if r.get(key))
    return runs


def median(rows: list[dict], field: str) -> float | None:
    values = [r[field] for r in rows if r.get(field) is not None]
    return statistics.median(values) if values else None


def main() -> int:
    path, key = sys.argv[1], sys.argv[2]
    runs = merged_runs(path, key)

    print(f"| config | rounds | pymta {key} | postfix {key} | ratio | ratio per round (min-max) "
          "| pymta CPU s/1000 | postfix CPU s/1000 | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, config), mine_runs in sorted(runs.items()):
        if name != "pymta":
            continue
        peer_runs = runs.get(("postfix", config), [])
        mine, theirs = median(mine_runs, key), median(peer_runs, key)
        cpu_mine, cpu_theirs = median(mine_runs, "server_cpu_per_k"), median(peer_runs, "server_cpu_per_k")
        paired = [a[key] / b[key] for a, b in zip(mine_runs, peer_runs, strict=False) if a.get(key) and b.get(key)]
        ratio = f"{mine / theirs:.2f}" if mine and theirs else "-"
        per_round = f"{statistics.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f})" if paired else "-"
        cpu_ratio = f"{cpu_mine / cpu_theirs:.2f}" if cpu_mine and cpu_theirs else "-"
        print(f"| {config} | {len(paired)} | {mine or '-'} | {theirs or '-'} | {ratio} | {per_round} "
              f"| {cpu_mine or '-'} | {cpu_theirs or '-'} | {cpu_ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

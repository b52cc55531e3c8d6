#!/usr/bin/env python3
"""Print pymta vs Postfix figures from a results.jsonl of the shared harness, with ratios.

  ratios.py RESULTS.jsonl KEY   (KEY: accept_mps or e2e_mps; CPU per 1000 messages is shown too)
Labels are NAME/s=SIZE/c=CONC[/reuse]; pymta rows are paired with postfix rows of the same size/conc.
"""

import json
import sys


def main() -> int:
    path, key = sys.argv[1], sys.argv[2]
    rows: dict[tuple[str, str], dict] = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            name, _, config = record["label"].partition("/")
            rows[(name, config)] = record["summary"]
    print(f"| config | pymta {key} | postfix {key} | ratio | pymta CPU s/1000 | postfix CPU s/1000 | CPU ratio |")
    print("|---|---|---|---|---|---|---|")
    for (name, config), summary in sorted(rows.items()):
        if name != "pymta":
            continue
        peer = rows.get(("postfix", config), {})
        mine = summary.get(key, {}).get("median")
        theirs = peer.get(key, {}).get("median")
        cpu_mine = summary.get("server_cpu_per_k", {}).get("median")
        cpu_theirs = peer.get("server_cpu_per_k", {}).get("median")
        ratio = f"{mine / theirs:.2f}" if mine and theirs else "-"
        cpu_ratio = f"{cpu_mine / cpu_theirs:.2f}" if cpu_mine and cpu_theirs else "-"
        print(f"| {config} | {mine or '-'} | {theirs or '-'} | {ratio} | {cpu_mine or '-'} | {cpu_theirs or '-'} | {cpu_ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""pymta's CPU per message with and without DKIM signing, from bench/relay.sh's results.jsonl.

  dkim_cost.py RESULTS.jsonl    (rows pymta/..., pymta-dkim-rsa/..., pymta-dkim-ed25519/... of the
                                 same size and concurrency; the difference is the signing cost)
"""

import sys

from ratios import median, merged_runs


def main() -> int:
    rows = {label: cpu for label, runs in merged_runs(sys.argv[1], "server_cpu_per_k").items()
            if (cpu := median(runs, "server_cpu_per_k")) is not None}  # fmt: skip
    print("| config | pymta CPU ms/msg | + DKIM RSA-2048 | + DKIM Ed25519 |")
    print("|---|---|---|---|")
    for (name, config), plain in sorted(rows.items()):
        if name != "pymta":
            continue
        cells = [f"{plain:.3f}"]
        for variant in ("pymta-dkim-rsa", "pymta-dkim-ed25519"):
            signed = rows.get((variant, config))
            cells.append(f"{signed:.3f} ({signed - plain:+.3f})" if signed is not None else "-")
        print(f"| {config} | " + " | ".join(cells) + " |")  # CPU s per 1000 messages = ms per message
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``pymta-map test ADDRESS``: what an address becomes through aliases, virtual maps, the recipient
delimiter and SRS, decided by the same code the RCPT stage runs (as an Internet client would see it)."""

from __future__ import annotations

import argparse
import sys
import time

from pymta.config import ConfigError, default_config_path, load_config


def map_main(argv: list[str] | None = None) -> int:
    """Exit 0 when the address is accepted, 1 when it is refused, 2 on a configuration error."""
    from pymta.inbound.aliases import TableError
    from pymta.stores import WallClock, recipient_policy

    parser = argparse.ArgumentParser(prog="pymta-map", description="Show how recipient addresses are expanded.")
    parser.add_argument("--config", default=None, help="configuration file (default: $PYMTA_CONFIG, else /etc/pymta/pymta.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    test = sub.add_parser("test", help="print the expansion of addresses")
    test.add_argument("addresses", nargs="+")
    test.add_argument("--sender", default=None, help="show the envelope sender forwarded mail would carry")
    test.add_argument("--trusted", action="store_true", help="as a client that may relay (relay_from, authenticated)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config or default_config_path())
        policy = recipient_policy(config, WallClock())
    except (ConfigError, TableError) as e:
        sys.stderr.write(f"pymta-map: configuration error: {e}\n")
        return 2
    status = 0
    for address in args.addresses:
        decision = policy.recipient(address, "127.0.0.1" if args.trusted else "", "pymta-map" if args.trusted else None)
        if decision.reply is not None:
            r = decision.reply
            print(f"{address}: refused {r.code} {r.enhanced} {r.text}")
            status = 1
            continue
        print(f"{address}:")
        for target in decision.deliveries():
            if target.route is None and target.reply is not None:
                print(f"  {target.address}  bounced {target.reply.code} {target.reply.enhanced} {target.reply.text}")
                continue
            line = f"  {target.address}  {target.route}"
            if target.forwarded:
                sender = policy.forward_sender(args.sender, time.time()) if args.sender else None
                line += f" (forwarded; sender {sender})" if sender else " (forwarded; SRS sender)" if policy.srs else " (forwarded)"
            if target.route == "local" and policy.over_quota(target.address):
                line += " (mailbox over quota)"
            print(line)
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(map_main())

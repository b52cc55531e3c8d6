"""Socket options every SMTP connection gets."""

from __future__ import annotations

from typing import Any


def set_nodelay(transport: Any) -> None:
    """TCP_NODELAY (no Nagle stall on small SMTP replies); a no-op for transports without it."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        try:
            setter(True)
        except OSError:
            pass

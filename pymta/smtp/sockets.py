"""Socket options every SMTP connection gets."""

from __future__ import annotations

import contextlib
from typing import Any


def set_nodelay(transport: Any) -> None:
    """TCP_NODELAY (no Nagle stall on small SMTP replies); a no-op for transports without it."""
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is not None:
        with contextlib.suppress(OSError):
            setter(True)

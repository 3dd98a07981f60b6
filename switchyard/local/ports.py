"""Free loopback ports for local runs, tests and benchmarks."""

from __future__ import annotations

import random
import socket

# Below Linux's default ephemeral range (32768-60999), so a port we pick is never taken
# a moment later as the local end of some outgoing connection.
_LOW, _HIGH = 20000, 32000


def free_port_block(count: int = 1) -> int:
    """First of ``count`` consecutive loopback ports that can all be bound right now."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(_LOW, _HIGH - count)
        if all(_bindable(first + i) for i in range(count)):
            return first
    raise RuntimeError(f"no block of {count} free ports")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

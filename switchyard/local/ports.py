"""Free loopback ports for local runs, tests and benchmarks."""

from __future__ import annotations

import random
import socket

# Below Linux's default ephemeral range (32768-60999), so a port we pick is never taken
# a moment later as the local end of some outgoing connection.
_LOW, _HIGH = 20000, 32000
# Ports already handed out by this process: a caller usually picks several ports before its
# servers bind any of them, so "bindable right now" alone could hand out one port twice.
_handed_out: set[int] = set()


def free_port_block(count: int = 1) -> int:
    """First of ``count`` consecutive loopback ports that can all be bound right now and that
    this process has not handed out before."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(_LOW, _HIGH - count)
        block = range(first, first + count)
        if _handed_out.isdisjoint(block) and all(bindable(port) for port in block):
            _handed_out.update(block)
            return first
    raise RuntimeError(f"no block of {count} free ports")


def bindable(port: int) -> bool:
    """Whether a listener could bind ``port`` on 127.0.0.1 right now."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True

"""Free-port picking for local runs and tests."""

from __future__ import annotations

import socket

from switchyard.local.ports import free_port_block


def test_ports_handed_out_are_never_handed_out_again_before_anything_binds_them() -> None:
    # 200 blocks of 3 from 12,000 ports: without the process-wide record, two blocks would
    # overlap with near certainty (about 8 overlapping pairs expected).
    blocks = [free_port_block(3) for _ in range(200)]
    ports = [first + i for first in blocks for i in range(3)]
    assert len(set(ports)) == len(ports)


def test_a_handed_out_block_is_bindable() -> None:
    first = free_port_block(2)
    for port in (first, first + 1):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))

"""A local ``redis-server`` (Debian's package) for the counters of budgets and rate limits:
`switchyard up` runs one when a ClientKeys document asks for it (``store.redis: local``), and
the tests run the same one.

It listens on a Unix socket in its directory (a loopback port when the path is too long, or
when a port is asked for), and appends every write to its AOF file with ``appendfsync always``:
a counter update Redis acknowledged is on disk, so it survives a restart.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
START_TIMEOUT_S = 30.0


def redis_binary() -> str:
    """The redis-server on PATH; RuntimeError saying how to install it."""
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "redis-server not found: `apt-get install redis-server` (a ClientKeys document "
            "sets store.redis: local)"
        )
    return found


class LocalRedis:
    """One redis-server with its data in ``directory``; ``port`` 0: a Unix socket."""

    def __init__(self, directory: Path, port: int = 0) -> None:
        self.directory = directory.resolve()
        socket_path = self.directory / "redis.sock"
        if port == 0 and len(str(socket_path)) >= _MAX_SOCKET_PATH:
            from switchyard.local.ports import free_port_block

            port = free_port_block()
        self.port = port
        self.socket_path = None if port else socket_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            return f"unix://{self.socket_path}"
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait until it answers PING (after loading its AOF)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            redis_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
            args += ["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
        self.process = subprocess.Popen(args, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: {self.log()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server did not answer within {START_TIMEOUT_S} s")
            time.sleep(0.02)

    def ping(self) -> bool:
        """Whether it answers PING with PONG (not while it loads its data)."""
        try:
            if self.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX)
                sock.settimeout(0.5)
                sock.connect(str(self.socket_path))
            else:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
            with sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF) and wait."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL: no chance to write anything more (what survives is what was fsynced)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

"""A real Prometheus (built by tests/infra/build_prometheus.sh) scraping given targets, for tests.

    with Prometheus.start(binary, directory, {"operator": ["127.0.0.1:9100"]}) as prom:
        prom.wait_scraped("operator", after=time.time())
        prom.query('switchyard_operator_config_generation')  # -> [Sample(labels, value)]

Each job scrapes its targets every second on ``metrics_path`` (or its own, in ``paths``).
Waiting is polling with a deadline: ``wait_scraped`` returns once Prometheus finished a scrape
of every target of a job that began after a given moment, so a query then sees what the
targets exposed at that moment or later.
"""

from __future__ import annotations

import datetime
import json
import math
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml

from switchyard.local.ports import free_port_block

T = TypeVar("T")
BUILD_SCRIPT = Path(__file__).with_name("build_prometheus.sh")


@dataclass(frozen=True)
class Sample:
    """One series of an instant vector: its labels (``__name__`` included) and value."""

    labels: dict[str, str]
    value: float


def build() -> str:
    """Build (or find cached) Prometheus; returns the binary's path."""
    built = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=3600
    )
    if built.returncode != 0:
        raise RuntimeError(f"build_prometheus.sh failed:\n{built.stderr[-4000:]}")
    return built.stdout.strip().splitlines()[-1]


class Prometheus:
    """One Prometheus process on a free loopback port, with its TSDB in ``directory``."""

    def __init__(
        self,
        binary: str,
        directory: Path,
        jobs: Mapping[str, Sequence[str]],
        metrics_path: str = "/metrics",
        interval_s: float = 1.0,
        paths: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.port = free_port_block()
        every = f"{round(interval_s * 1000)}ms"  # Prometheus durations take no fractions
        config = {
            "global": {"scrape_interval": every, "scrape_timeout": every},
            "scrape_configs": [
                {
                    "job_name": job,
                    "metrics_path": (paths or {}).get(job, metrics_path),
                    "static_configs": [{"targets": list(targets)}],
                }
                for job, targets in jobs.items()
            ],
        }
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = directory / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @classmethod
    def start(
        cls, binary: str, directory: Path, jobs: Mapping[str, Sequence[str]], **kwargs: Any
    ) -> Prometheus:
        """Start one and wait until it is ready (GET /-/ready answers 200)."""
        prometheus = cls(binary, directory, jobs, **kwargs)
        try:
            prometheus.wait(prometheus.ready, "Prometheus /-/ready", 60)
        except BaseException:
            prometheus.stop()
            raise
        return prometheus

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            self._check_running()
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns its ``data`` (raises on an error status)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as reply:
                body = json.loads(reply.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[Sample]:
        """An instant query, now; instant vectors and scalars (one unlabelled sample)."""
        data = self.api("query", query=promql)
        if data["resultType"] == "vector":
            return [Sample(r["metric"], float(r["value"][1])) for r in data["result"]]
        if data["resultType"] == "scalar":
            return [Sample({}, float(data["result"][1]))]
        raise ValueError(f"{promql}: a {data['resultType']}, not an instant vector")

    def value(self, promql: str) -> float | None:
        """The one value of ``promql`` (None when it selects nothing)."""
        samples = self.query(promql)
        if len(samples) > 1:
            raise ValueError(f"{promql}: {len(samples)} series, expected at most one")
        return samples[0].value if samples else None

    def targets(self, job: str) -> list[dict[str, Any]]:
        """The active targets of ``job`` (as /api/v1/targets lists them)."""
        active = self.api("targets", state="active")["activeTargets"]
        return [t for t in active if t["labels"].get("job") == job]

    def wait_scraped(self, job: str, after: float, timeout: float = 30) -> None:
        """Wait until every target of ``job`` was scraped successfully, by a scrape that
        started at or after ``after`` (a time.time(); to the millisecond, as Prometheus
        stamps samples), and its samples are stored (queries see them)."""
        since = math.floor(after * 1000) / 1000

        def done() -> bool:
            targets = self.targets(job)
            if not targets or any(_epoch(t["lastScrape"]) < since for t in targets):
                return False
            # lastScrape may be reported before the samples are committed; `up` is committed
            # with them, stamped with the scrape's start.
            stored = self.query(f'timestamp(up{{job="{job}"}} == 1)')
            return len(stored) == len(targets) and all(s.value >= since for s in stored)

        def why() -> str:
            return "; ".join(
                f"{t['scrapeUrl']}: {t['health']} {t['lastError']} at {t['lastScrape']}"
                for t in self.targets(job)
            )

        self.wait(done, f"a scrape of job {job} after {after:.3f}", timeout, why)

    def wait(
        self,
        condition: Callable[[], T],
        what: str,
        timeout: float = 30,
        why: Callable[[], str] | None = None,
    ) -> T:
        """Poll ``condition`` until truthy; fails with ``what`` (and ``why()``) at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                detail = f": {why()}" if why is not None else ""
                raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop (SIGTERM, then SIGKILL after 30 s) and close the log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()

    def _check_running(self) -> None:
        if self.process.poll() is not None:
            log = self.log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{log}")


def _epoch(stamp: str) -> float:
    """RFC 3339 with nanoseconds (Prometheus' lastScrape) → seconds since the epoch."""
    if stamp.startswith("0001-01-01"):
        return 0.0  # never scraped
    main, _, rest = stamp.partition(".")
    if not rest:  # no fraction: 2026-01-01T00:00:00Z or ...+01:00
        return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    digits = "".join(c for c in rest if c.isdigit()) or "0"
    zone = rest[len(digits) :].replace("Z", "+00:00")
    whole = datetime.datetime.fromisoformat(main + zone).timestamp()
    return whole + float(f"0.{digits}")

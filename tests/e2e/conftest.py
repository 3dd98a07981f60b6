"""Fixtures for the end-to-end tests: a real single-node Kubernetes cluster (tests/infra/node.py)
with every test image (tests/infra/images.py) built and imported, once per pytest session.

  images     session: image name -> reference, e.g. ``images["switchyard"]`` is
             ``localhost/switchyard:<content hash>``; also pause, busybox, coredns, envoy.
             Pods use them with ``imagePullPolicy: Never`` (there is no registry).
  kube_node  session: the running node (KubeNode): ``kubectl``, ``helm``, ``run`` (a command
             inside the node's netns, where Service ClusterIPs and cluster DNS names work),
             ``wait_ready``, ``wait_endpoints``. Stopped at the end of the session, also when
             tests fail; nothing is left behind.

The first session on a machine builds the Kubernetes binaries (many minutes) and the images
(a few minutes); later ones find them cached. The node needs root and ``make node-tools``:
without them these tests fail, or are skipped with SWITCHYARD_SKIP_NODE=1 (never in CI).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_INFRA = str(Path(__file__).resolve().parents[1] / "infra")
if _INFRA not in sys.path:
    sys.path.insert(0, _INFRA)

from images import Image, build_images, image_refs  # noqa: E402
from node import KubeNode, node_bin_dir, node_tools_missing, reap_stale_nodes  # noqa: E402


@pytest.fixture(scope="session")
def node_bin() -> Path:
    """Every binary the node runs (built on first use, cached by version)."""
    missing = node_tools_missing()
    if missing:
        message = f"the single-node cluster needs: {', '.join(missing)} (make node-tools)"
        if os.environ.get("SWITCHYARD_SKIP_NODE") == "1":
            pytest.skip(message)
        pytest.fail(f"{message}; SWITCHYARD_SKIP_NODE=1 skips these tests")
    return node_bin_dir()


@pytest.fixture(scope="session")
def built_images(node_bin: Path) -> dict[str, Image]:
    """Every test image, built (or found in the cache) as a docker-archive tar."""
    return build_images(node_bin)


@pytest.fixture(scope="session")
def images(built_images: dict[str, Image]) -> dict[str, str]:
    """Image name -> reference (``localhost/<name>:<content hash>``)."""
    return image_refs(built_images)


@pytest.fixture(scope="session")
def kube_node(node_bin: Path, built_images: dict[str, Image]) -> Iterator[KubeNode]:
    """The running single-node cluster, every image imported, CoreDNS up."""
    for name in reap_stale_nodes():  # left by a session that was killed
        sys.stderr.write(f"\nstopped the stale node {name}\n")
    node = KubeNode(
        node_bin,
        pause_image=built_images["pause"].ref,
        coredns_image=built_images["coredns"].ref,
        image_tars=[image.tar for image in built_images.values()],
    )
    node.up()  # a failed up() has stopped the node again
    sys.stderr.write(f"\nkube_node {node.netns} up in {node.timings['up']:.1f}s ({node.root})\n")
    try:
        yield node
    finally:
        node.down()
        sys.stderr.write(f"\nkube_node {node.netns} down in {node.timings['down']:.1f}s\n")

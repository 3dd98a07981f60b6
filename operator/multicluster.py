"""Where Service backends run: ready endpoints from EndpointSlices in this and remote clusters.

``EndpointDirectory`` keeps the ready endpoints of every Service per cluster (the operator's own
cluster and each remote one), fed by EndpointSlice events. Remote clusters come from kubeconfig
Secrets; ``RemoteClusterWatch`` lists and watches one remote cluster's EndpointSlices on a
thread (the ``kubernetes`` client blocks) and hands every change to the event loop, where the
directory is only ever touched.

A Service is the same Service in every cluster when its namespace and name match (the
"namespace sameness" of Kubernetes multi-cluster Services). Which cluster's endpoints come
first, and which regions are allowed at all, is decided by the compiler (``place_endpoints``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes

from switchyard.api.v1 import routing_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_LABEL = "kubernetes.io/service-name"
CLUSTER_LABEL = "switchyard.dev/cluster"
"""On a Secret: it holds a remote cluster's kubeconfig (key ``kubeconfig``); value = its name."""
REGION_LABEL = "switchyard.dev/region"
"""On a remote-cluster Secret: the region that cluster runs in."""
KUBECONFIG_KEY = "kubeconfig"


def service_dns_name(service: pb.ServiceRef) -> str:
    """The in-cluster DNS name of a Service."""
    return f"{service.name}.{service.namespace}.svc.cluster.local"


@dataclass(frozen=True)
class Topology:
    """The clusters the operator knows: its own (``local``) and each one's region."""

    local: str = "local"
    regions: Mapping[str, str] = field(default_factory=dict)

    def region(self, cluster: str) -> str:
        return self.regions.get(cluster, "")


@dataclass(frozen=True)
class _Slice:
    service: str
    ports: tuple[int, ...]
    endpoints: tuple[tuple[str, str], ...]
    """(address, zone) of each ready endpoint."""


def _parse_slice(body: Mapping[str, Any]) -> _Slice | None:
    meta = body.get("metadata") or {}
    service = (meta.get("labels") or {}).get(SERVICE_LABEL)
    if not service:
        return None
    ports = tuple(sorted({int(p["port"]) for p in body.get("ports") or [] if p.get("port")}))
    ready = tuple(
        (address, endpoint.get("zone") or "")
        for endpoint in body.get("endpoints") or []
        if (endpoint.get("conditions") or {}).get("ready", True) is not False
        for address in endpoint.get("addresses") or []
    )
    return _Slice(service, ports, ready)


class EndpointDirectory:
    """Ready endpoints of every Service, per cluster, from EndpointSlice events."""

    def __init__(self, local_cluster: str = "local", local_region: str = "") -> None:
        self.local_cluster = local_cluster
        self._regions: dict[str, str] = {local_cluster: local_region}
        self._slices: dict[tuple[str, str, str], _Slice] = {}

    @property
    def topology(self) -> Topology:
        return Topology(self.local_cluster, dict(self._regions))

    def apply(self, cluster: str, event_type: str, body: Mapping[str, Any]) -> bool:
        """One EndpointSlice event (ADDED, MODIFIED, DELETED); True when something changed."""
        meta = body.get("metadata") or {}
        key = (cluster, meta.get("namespace", ""), meta.get("name", ""))
        parsed = None if event_type == "DELETED" else _parse_slice(body)
        before = self._slices.get(key)
        if parsed is None:
            self._slices.pop(key, None)
        else:
            self._slices[key] = parsed
        return before != parsed

    def replace_cluster(
        self, cluster: str, region: str, bodies: Iterable[Mapping[str, Any]]
    ) -> bool:
        """A full listing of one cluster's slices (start-up or re-list); True if it changed."""
        before = {k: v for k, v in self._slices.items() if k[0] == cluster}
        changed = self._regions.get(cluster) != region
        self._regions[cluster] = region
        for key in before:
            del self._slices[key]
        for body in bodies:
            self.apply(cluster, "ADDED", body)
        after = {k: v for k, v in self._slices.items() if k[0] == cluster}
        return changed or before != after

    def drop_cluster(self, cluster: str) -> None:
        """Forget a remote cluster (its Secret was deleted)."""
        if cluster == self.local_cluster:
            return
        self._regions.pop(cluster, None)
        for key in [k for k in self._slices if k[0] == cluster]:
            del self._slices[key]

    def endpoints(self, namespace: str, service: str, port: int) -> list[pb.Endpoint]:
        """Ready endpoints of a Service port in every cluster, unordered.

        Slices carry target ports, not Service ports: endpoints on ``port`` itself are used, and
        otherwise a Service whose slices (in one cluster) expose a single port answer with it.
        """
        by_cluster: dict[str, list[tuple[str, str, int]]] = {}
        for (cluster, ns, _), found in self._slices.items():
            if (ns, found.service) == (namespace, service):
                members = by_cluster.setdefault(cluster, [])
                members.extend((a, z, p) for a, z in found.endpoints for p in found.ports)
        out: list[pb.Endpoint] = []
        for cluster, members in by_cluster.items():
            exact = [m for m in members if m[2] == port]
            chosen = exact if exact or len({m[2] for m in members}) != 1 else members
            region = self._regions.get(cluster, "")
            out.extend(
                pb.Endpoint(address=a, port=p, zone=z, cluster=cluster, region=region)
                for a, z, p in chosen
            )
        return out


def place_endpoints(
    found: Iterable[pb.Endpoint], preferred: str, topology: Topology, region: str = ""
) -> list[pb.Endpoint]:
    """Filter by the model's ``region`` (unknown regions never qualify) and assign priorities:
    0 for the preferred cluster, then other clusters in its region, then the rest; priorities
    are renumbered to stay contiguous, so the best cluster that has endpoints is always 0."""
    home_region = topology.region(preferred)
    allowed = [e for e in found if not region or e.region == region]

    def rank(endpoint: pb.Endpoint) -> int:
        if endpoint.cluster == preferred:
            return 0
        return 1 if home_region and endpoint.region == home_region else 2

    ranks = sorted({rank(e) for e in allowed})
    placed = []
    for endpoint in allowed:
        copy = pb.Endpoint()
        copy.CopyFrom(endpoint)
        copy.priority = ranks.index(rank(endpoint))
        placed.append(copy)
    return sorted(placed, key=lambda e: (e.priority, e.cluster, e.address, e.port))


@dataclass(frozen=True)
class RemoteCluster:
    """A remote cluster as its Secret describes it (the kubeconfig never reaches logs)."""

    name: str
    region: str
    kubeconfig: dict[str, Any] = field(repr=False)


class EndpointSliceWatch:
    """Lists, then watches, EndpointSlices on a daemon thread.

    Every listing or event is handed to the event loop (``call_soon_threadsafe``), applied to
    the directory there (as cluster ``cluster``), then ``on_change`` runs. Errors re-list after
    a capped backoff; the last known endpoints stay in place meanwhile.
    """

    def __init__(
        self,
        cluster: str,
        region: str,
        api_client: Callable[[], Any],
        directory: EndpointDirectory,
        on_change: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        *,
        namespace: str = "",
        label_selector: str = SERVICE_LABEL,
        watch_timeout_s: int = 60,
    ) -> None:
        self.cluster = cluster
        self.region = region
        self._api_client = api_client
        self._namespace = namespace
        self._label_selector = label_selector
        self._directory = directory
        self._on_change = on_change
        self._loop = loop
        self._watch_timeout_s = watch_timeout_s
        self._stopped = threading.Event()
        self._watch: kubernetes.watch.Watch | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"endpointslices-{cluster}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop reporting at once; the thread ends at its next event or watch timeout."""
        self._stopped.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]

    def _post(self, change: Callable[[], bool]) -> None:
        def apply() -> None:
            if not self._stopped.is_set() and change():
                self._on_change()

        self._loop.call_soon_threadsafe(apply)

    def _replace(self, bodies: list[dict[str, Any]]) -> bool:
        return self._directory.replace_cluster(self.cluster, self.region, bodies)

    def _run(self) -> None:
        backoff = 1.0
        while not self._stopped.is_set():
            try:
                self._list_and_watch()
                backoff = 1.0
            except Exception as error:  # any failure: re-list later, never die
                log.warning(
                    "EndpointSlices of %s: %s; retrying in %.0fs",
                    self.cluster,
                    type(error).__name__,
                    backoff,
                )
                self._stopped.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def _list_and_watch(self) -> None:
        discovery = kubernetes.client.DiscoveryV1Api(self._api_client())
        lister: Callable[..., Any]
        if self._namespace:
            lister = functools.partial(discovery.list_namespaced_endpoint_slice, self._namespace)
        else:
            lister = discovery.list_endpoint_slice_for_all_namespaces
        response: Any = lister(
            label_selector=self._label_selector, _preload_content=False, _request_timeout=15
        )
        listing = json.loads(response.data)
        bodies = list(listing.get("items") or [])
        self._post(lambda: self._replace(bodies))
        log.info("%s: %d EndpointSlices", self.cluster, len(bodies))
        self._watch = watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        if self._stopped.is_set():
            return
        for event in watch.stream(  # type: ignore[no-untyped-call]
            lister,
            label_selector=self._label_selector,
            resource_version=listing["metadata"]["resourceVersion"],
            timeout_seconds=self._watch_timeout_s,
            allow_watch_bookmarks=True,
        ):
            kind, body = event["type"], event["raw_object"]
            if kind == "ERROR":  # e.g. 410 Gone: the resourceVersion is too old; re-list
                return
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._post(functools.partial(self._directory.apply, self.cluster, kind, body))


class RemoteClusterWatch(EndpointSliceWatch):
    """Every Service's EndpointSlices in a remote cluster (from its kubeconfig Secret)."""

    def __init__(
        self,
        remote: RemoteCluster,
        directory: EndpointDirectory,
        on_change: Callable[[], None],
        loop: asyncio.AbstractEventLoop,
        watch_timeout_s: int = 60,
    ) -> None:
        self.remote = remote
        super().__init__(
            remote.name,
            remote.region,
            functools.partial(kubernetes.config.new_client_from_config_dict, remote.kubeconfig),
            directory,
            on_change,
            loop,
            watch_timeout_s=watch_timeout_s,
        )

#!/usr/bin/env bash
# Build Prometheus (github.com/prometheus/prometheus/cmd/prometheus), the metrics server that
# tests/infra/prometheus.py runs to scrape the operator in tests/integration, from the Go module
# proxy only (no release downloads, no Docker), cached by version and tags
# (tests/infra/go_tool.sh; the first build takes minutes). The LAST line on stdout is the
# binary's path. Knobs: PROMETHEUS_VERSION, PROMETHEUS_TAGS, SWITCHYARD_CACHE,
# SWITCHYARD_BUILD_JOBS, GO.
set -euo pipefail
source "$(dirname "$0")/go_tool.sh"

# Prometheus 3.x is tagged v0.3XX.Y in Go (v0.316.0 is Prometheus 3.16.0).
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"
# Without `builtinassets` (upstream's release tag) the web UI is served from ./web/ui on disk,
# which the module zip lacks: the UI pages 404 but the HTTP API and /-/ready work, and no
# node/pnpm build is needed. `remove_all_sd` leaves out the cloud service discoveries (AWS,
# Azure, GCE, Kubernetes, ...): the tests only use static_configs, and it halves the build.
PROMETHEUS_TAGS="${PROMETHEUS_TAGS:-netgo,remove_all_sd}"
JOBS="${SWITCHYARD_BUILD_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
MODULE=github.com/prometheus/prometheus

build() {  # build WORKDIR
  # A wrapper module, as switchyard/local/build_jaeger.sh: copy any replace directives of
  # upstream's go.mod (v0.316.0 has none) so the build matches upstream's dependency versions.
  "$GO" mod download -json "${MODULE}@${PROMETHEUS_VERSION}" >/dev/null
  local gomod semver
  gomod="$("$GO" env GOMODCACHE)/cache/download/${MODULE}/@v/${PROMETHEUS_VERSION}.mod"
  [[ -f "$gomod" ]] || { echo "build_prometheus: no go.mod for ${MODULE}@${PROMETHEUS_VERSION}"; return 1; }
  sed -n 's/^replace \([^ ]*\) => \([^ ]*\) \(v[^ ]*\)$/\1=\2@\3/p' "$gomod" | while read -r r; do
    "$GO" mod edit -replace "$r"
  done
  "$GO" get "${MODULE}/cmd/prometheus@${PROMETHEUS_VERSION}"
  # v0.3XX.Y -> 3.XX.Y for `prometheus --version` and the build_info metric.
  semver="$(sed -n 's/^v0\.3\([0-9][0-9]\)\.\([0-9]*\)$/3.\1.\2/p' <<<"$PROMETHEUS_VERSION")"
  "$GO" build -p "$JOBS" -trimpath -tags "$PROMETHEUS_TAGS" -o "$1/prometheus" \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=${semver:-$PROMETHEUS_VERSION}" \
    "${MODULE}/cmd/prometheus"
}

go_tool prometheus "$PROMETHEUS_VERSION $PROMETHEUS_TAGS" build

#!/usr/bin/env bash
# Build Jaeger (github.com/jaegertracing/jaeger/cmd/jaeger: the all-in-one OTLP receiver, trace
# store and query API) from the Go module proxy only (no release downloads, no Docker), cached by
# version in ${SWITCHYARD_CACHE:-~/.cache/switchyard}/bin (go_tool.sh; the first build takes
# minutes). `switchyard up --jaeger` runs it when the cache has no Jaeger (switchyard/local/
# jaeger.py), `make jaeger` and tests/integration/test_tracing.py too. The web UI's assets are
# built from another repository (jaeger-ui, JavaScript) and are not in the module: this binary
# serves the query API and a placeholder page. The LAST line on stdout is the binary's path.
# Knobs: JAEGER_VERSION (keep it equal to jaeger.py's JAEGER_VERSION), SWITCHYARD_CACHE,
# SWITCHYARD_BUILD_JOBS, GO.
set -euo pipefail
source "$(dirname "$0")/go_tool.sh"

JAEGER_VERSION="${JAEGER_VERSION:-v1.76.0}"
JOBS="${SWITCHYARD_BUILD_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
MODULE=github.com/jaegertracing/jaeger

build() {  # build WORKDIR
  # A wrapper module (not `go install pkg@version`): jaeger's go.mod has replace directives,
  # which only the main module may carry; copy each one here so the build matches upstream's.
  "$GO" mod download -json "${MODULE}@${JAEGER_VERSION}" >/dev/null
  local gomod
  gomod="$("$GO" env GOMODCACHE)/cache/download/${MODULE}/@v/${JAEGER_VERSION}.mod"
  [[ -f "$gomod" ]] || { echo "build_jaeger: no go.mod for ${MODULE}@${JAEGER_VERSION}"; return 1; }
  sed -n 's/^replace \([^ ]*\) => \([^ ]*\) \(v[^ ]*\)$/\1=\2@\3/p' "$gomod" | while read -r r; do
    "$GO" mod edit -replace "$r"
  done
  "$GO" get "${MODULE}/cmd/jaeger@${JAEGER_VERSION}"
  "$GO" build -p "$JOBS" -trimpath -o "$1/jaeger" \
    -ldflags "-s -w -X ${MODULE}/internal/version.latestVersion=${JAEGER_VERSION}" \
    "${MODULE}/cmd/jaeger"
}

go_tool jaeger "$JAEGER_VERSION" build

#!/usr/bin/env bash
# Build Jaeger (github.com/jaegertracing/jaeger/cmd/jaeger: the all-in-one trace store, OTLP
# receiver and query UI) that tests/integration/test_tracing.py exports traces to, from the Go
# module proxy only (no release downloads, no Docker).
#
# The binary is cached by version OUTSIDE the repository, under
#   ${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/bin/jaeger
# with a stamp of the version it was built from (bin/.jaeger.version); a binary whose stamp
# matches is never rebuilt. Safe to run concurrently (a lock serialises builders). Progress
# goes to stderr; the LAST line on stdout is the binary's path.
#
# Knobs: JAEGER_VERSION, SWITCHYARD_CACHE, SWITCHYARD_BUILD_JOBS, GO (the go command).
set -euo pipefail

JAEGER_VERSION="${JAEGER_VERSION:-v1.76.0}"
BIN="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/bin"
JOBS="${SWITCHYARD_BUILD_JOBS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)}"
MODULE=github.com/jaegertracing/jaeger

GO="${GO:-$(command -v go || true)}"
[[ -n "$GO" ]] || GO=/usr/local/go/bin/go

fresh() { [[ -x "$BIN/jaeger" && "$(cat "$BIN/.jaeger.version" 2>/dev/null)" == "$JAEGER_VERSION" ]]; }

if fresh; then
  echo "$BIN/jaeger"
  exit 0
fi
mkdir -p "$BIN"
exec 9>"$BIN/.jaeger.lock"
if ! flock -n 9; then
  echo "build_jaeger: another build holds $BIN/.jaeger.lock; waiting" >&2
  flock 9
fi
if fresh; then  # built by the holder of the lock meanwhile
  echo "$BIN/jaeger"
  exit 0
fi
command -v "$GO" >/dev/null || { echo "build_jaeger: no go toolchain (set GO=/path/to/go)" >&2; exit 1; }
echo "build_jaeger: building jaeger $JAEGER_VERSION with $("$GO" version) (minutes)" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Reproducible, static, module-mode builds with the local toolchain only; install atomically.
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local GO111MODULE=on
cd "$work"
"$GO" mod init switchyard.local/jaeger >/dev/null 2>&1
# A wrapper module (not `go install pkg@version`): jaeger's go.mod has a replace directive,
# which only the main module may carry; copy each one here so the build matches upstream's.
"$GO" mod download -json "${MODULE}@${JAEGER_VERSION}" >/dev/null
gomod="$("$GO" env GOMODCACHE)/cache/download/${MODULE}/@v/${JAEGER_VERSION}.mod"
[[ -f "$gomod" ]] || { echo "build_jaeger: no go.mod for ${MODULE}@${JAEGER_VERSION}" >&2; exit 1; }
sed -n 's/^replace \([^ ]*\) => \([^ ]*\) \(v[^ ]*\)$/\1=\2@\3/p' "$gomod" | while read -r r; do
  "$GO" mod edit -replace "$r"
done
"$GO" get "${MODULE}/cmd/jaeger@${JAEGER_VERSION}" >&2
v="${MODULE}/internal/version"
"$GO" build -p "$JOBS" -trimpath -o "$work/jaeger" \
  -ldflags "-s -w -X ${v}.latestVersion=${JAEGER_VERSION}" "${MODULE}/cmd/jaeger" >&2
mv -f "$work/jaeger" "$BIN/jaeger"
echo "$JAEGER_VERSION" > "$BIN/.jaeger.version"
echo "build_jaeger: built $BIN/jaeger" >&2
echo "$BIN/jaeger"

#!/usr/bin/env bash
# Build h2spec (github.com/summerwind/h2spec), the HTTP/2 conformance tester that
# tests/integration/test_h2spec.py runs against an ext_proc worker, from the Go module proxy
# only (no release downloads).
#
# The binary is cached by version OUTSIDE the repository, under
#   ${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/bin/h2spec
# with a stamp of the version it was built from (bin/.h2spec.version); a binary whose stamp
# matches is never rebuilt. Safe to run concurrently (a lock serialises builders). Progress
# goes to stderr; the LAST line on stdout is the binary's path.
#
# Knobs: H2SPEC_VERSION, SWITCHYARD_CACHE, GO (the go command).
set -euo pipefail

# The newest version the proxy serves. Its v2 tags have no go.mod (hence +incompatible), so
# `go install pkg@version` would take whatever dependency versions are newest that day: the
# build goes through a wrapper module that pins them instead.
H2SPEC_VERSION="${H2SPEC_VERSION:-v2.2.1+incompatible}"
DEPS=(golang.org/x/net@v0.62.0 github.com/spf13/cobra@v1.10.2 github.com/fatih/color@v1.19.0)
STAMP="$H2SPEC_VERSION ${DEPS[*]}"
BIN="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/bin"

GO="${GO:-$(command -v go || true)}"
[[ -n "$GO" ]] || GO=/usr/local/go/bin/go

fresh() { [[ -x "$BIN/h2spec" && "$(cat "$BIN/.h2spec.version" 2>/dev/null)" == "$STAMP" ]]; }

if fresh; then
  echo "$BIN/h2spec"
  exit 0
fi
mkdir -p "$BIN"
exec 9>"$BIN/.h2spec.lock"
if ! flock -n 9; then
  echo "build_h2spec: another build holds $BIN/.h2spec.lock; waiting" >&2
  flock 9
fi
if fresh; then  # built by the holder of the lock meanwhile
  echo "$BIN/h2spec"
  exit 0
fi
command -v "$GO" >/dev/null || { echo "build_h2spec: no go toolchain (set GO=/path/to/go)" >&2; exit 1; }
echo "build_h2spec: building h2spec $H2SPEC_VERSION with $("$GO" version)" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# Reproducible, static, module-mode builds with the local toolchain only; install atomically.
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local GO111MODULE=on
cd "$work"
"$GO" mod init switchyard.local/h2spec >/dev/null 2>&1
"$GO" get "github.com/summerwind/h2spec@${H2SPEC_VERSION}" "${DEPS[@]}" >&2
"$GO" build -trimpath -ldflags "-s -w" -o "$work/h2spec" github.com/summerwind/h2spec/cmd/h2spec >&2
mv -f "$work/h2spec" "$BIN/h2spec"
echo "$STAMP" > "$BIN/.h2spec.version"
echo "build_h2spec: built $("$BIN/h2spec" --version 2>&1 | head -1)" >&2
echo "$BIN/h2spec"

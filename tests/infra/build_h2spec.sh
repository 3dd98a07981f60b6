#!/usr/bin/env bash
# Build h2spec (github.com/summerwind/h2spec), the HTTP/2 conformance tester that
# tests/integration/test_h2spec.py runs against an ext_proc worker, from the Go module proxy
# only (no release downloads), cached by version (tests/infra/go_tool.sh). The LAST line on
# stdout is the binary's path. Knobs: H2SPEC_VERSION, SWITCHYARD_CACHE, GO.
set -euo pipefail
source "$(dirname "$0")/go_tool.sh"

# The newest version the proxy serves. Its v2 tags have no go.mod (hence +incompatible), so
# `go install pkg@version` would take whatever dependency versions are newest that day: the
# build goes through a wrapper module that pins them instead.
H2SPEC_VERSION="${H2SPEC_VERSION:-v2.2.1+incompatible}"
DEPS=(golang.org/x/net@v0.62.0 github.com/spf13/cobra@v1.10.2 github.com/fatih/color@v1.19.0)

build() {  # build WORKDIR
  "$GO" get "github.com/summerwind/h2spec@${H2SPEC_VERSION}" "${DEPS[@]}"
  "$GO" build -trimpath -ldflags "-s -w" -o "$1/h2spec" github.com/summerwind/h2spec/cmd/h2spec
}

go_tool h2spec "$H2SPEC_VERSION ${DEPS[*]}" build

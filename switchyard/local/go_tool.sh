# Sourced by the build_<tool>.sh scripts (here and in tests/infra/): build one Go tool from the
# Go module proxy only, once per stamp, into ${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/bin
# (outside the repository).
#
#   go_tool NAME STAMP BUILD
#
# Unless bin/NAME exists and bin/.NAME.version holds STAMP, runs `BUILD WORKDIR` in a fresh
# wrapper module (switchyard.local/NAME) with static, module-mode, local-toolchain settings;
# BUILD must leave the binary at WORKDIR/NAME, which is then installed atomically and stamped.
# Concurrent builders are serialised by a lock. Progress goes to stderr; the LAST line on
# stdout is the binary's path. Knobs: SWITCHYARD_CACHE, GO (the go command).

go_tool() {
  local name=$1 stamp=$2 build=$3
  local bin="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}/bin"
  GO="${GO:-$(command -v go || true)}"
  [[ -n "$GO" ]] || GO=/usr/local/go/bin/go
  _go_tool_fresh() { [[ -x "$bin/$name" && "$(cat "$bin/.$name.version" 2>/dev/null)" == "$stamp" ]]; }
  if _go_tool_fresh; then
    echo "$bin/$name"
    return 0
  fi
  mkdir -p "$bin"
  exec 9>"$bin/.$name.lock"
  if ! flock -n 9; then
    echo "build_$name: another build holds $bin/.$name.lock; waiting" >&2
    flock 9
  fi
  if _go_tool_fresh; then  # built by the holder of the lock meanwhile
    echo "$bin/$name"
    return 0
  fi
  command -v "$GO" >/dev/null || { echo "build_$name: no go toolchain (set GO=/path/to/go)" >&2; return 1; }
  echo "build_$name: building $name $stamp with $("$GO" version)" >&2
  local work
  work="$(mktemp -d)"
  # shellcheck disable=SC2064  # expand now: $work is local to this function
  trap "rm -rf '$work'" EXIT
  (
    export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local GO111MODULE=on
    cd "$work"
    "$GO" mod init "switchyard.local/$name" >/dev/null 2>&1
    "$build" "$work"
  ) >&2
  mv -f "$work/$name" "$bin/$name"
  echo "$stamp" > "$bin/.$name.version"
  echo "build_$name: built $bin/$name" >&2
  echo "$bin/$name"
}

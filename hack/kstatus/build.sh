#!/usr/bin/env bash
# Builds hack/kstatus (the real kstatus library over objects on stdin) once, into a cache keyed by its sources.
# Prints the binary's path. The module comes from the Go module proxy, like hack/build-binaries.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}
key=$(cat "$here/go.mod" "$here/go.sum" "$here/main.go" | sha256sum | cut -c1-16)
bin="$cache/bin/kstatus-$key"
if [ ! -x "$bin/kstatus" ]; then
  command -v go >/dev/null 2>&1 || { echo "error: the Go toolchain is missing: install Go >= 1.24 and put 'go' on PATH" >&2; exit 1; }
  mkdir -p "$bin"
  printf '[build] building kstatus %s\n' "$key" >&2
  (cd "$here" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w" -o "$bin/kstatus.tmp" .)
  mv "$bin/kstatus.tmp" "$bin/kstatus"
fi
echo "$bin/kstatus"

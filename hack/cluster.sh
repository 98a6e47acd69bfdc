#!/usr/bin/env bash
# The local cluster for tests and the demo: real Kubernetes binaries plus KWOK nodes and pods, no containers.
# Usage: hack/cluster.sh up|down|status|kubeconfig
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
name=${MODELFLEET_CLUSTER_NAME:-modelfleet}
port=${MODELFLEET_APISERVER_PORT:-36443}
cache=${MODELFLEET_CACHE:-$HOME/.cache/modelfleet}
bin="$cache/bin/k8s-$KUBE_VERSION-kwok-$KWOK_VERSION-etcd-$ETCD_VERSION"
export KWOK_WORKDIR="$cache/kwok"
cdir="$KWOK_WORKDIR/clusters/$name"
kubeconfig="$cdir/kubeconfig.yaml"
components=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok-controller)

log() { printf '[cluster] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
kctl() { "$bin/kubectl" --kubeconfig "$kubeconfig" "$@"; }

port_owner() {  # prints "pid/name" of whoever listens on the port, or nothing
  local p=$1 hex inode pid
  hex=$(printf ':%04X' "$p")
  inode=$(awk -v h="$hex" '$2 ~ h"$" && $4 == "0A" {print $10; exit}' /proc/net/tcp /proc/net/tcp6 2>/dev/null)
  [ -n "$inode" ] || return 0
  for pid in /proc/[0-9]*; do
    if ls -l "$pid/fd" 2>/dev/null | grep -q "socket:\[$inode\]"; then
      echo "${pid#/proc/}/$(cat "$pid/comm" 2>/dev/null)"; return 0
    fi
  done
  echo "unknown process"
}

alive() {  # a zombie (killed, never reaped by its parent) is not alive
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

component_pid() {  # pid of a live component of this cluster, or nothing
  local f="$cdir/pids/$1.pid"
  [ -f "$f" ] && alive "$(cat "$f")" && cat "$f"
  return 0
}

stages="$here/kwok/config.yaml"
stages_sum=$(sha256sum "$stages" | cut -c1-16)
exists() { [ -f "$cdir/kwok.yaml" ]; }
current() { [ "$(cat "$cdir/stages.sum" 2>/dev/null)" = "$stages_sum" ]; }

healthy() {
  local c
  for c in "${components[@]}"; do [ -n "$(component_pid "$c")" ] || return 1; done
  kctl get --raw /readyz >/dev/null 2>&1
}

ensure_binaries() {
  local c missing=0
  for c in kube-apiserver kube-controller-manager kube-scheduler kwok kwokctl etcd kubectl helm; do
    [ -s "$bin/$c" ] || missing=1
  done
  [ $missing -eq 0 ] || bash "$here/build-binaries.sh" >/dev/null
}

apply_fleet() {
  python3 "$here/fleet.py" "${MODELFLEET_FLEET_SCALE:-1}" | kctl apply -f - >/dev/null
  local want; want=$(python3 "$here/fleet.py" "${MODELFLEET_FLEET_SCALE:-1}" | grep -c '"kind": "Node"')
  local i
  for i in $(seq 1 60); do
    [ "$(kctl get nodes --no-headers 2>/dev/null | grep -cw Ready)" -ge "$want" ] && return 0
    sleep 1
  done
  die "the fake nodes did not become Ready within 60s: see 'hack/cluster.sh status' and $cdir/logs/kwok-controller.log"
}

cmd_up() {
  local t0=$SECONDS
  ensure_binaries
  if exists && healthy && current; then
    log "cluster '$name' is already running"
  else
    if exists && ! current; then
      log "hack/kwok/config.yaml changed since cluster '$name' was created: recreating it"
      cmd_down >/dev/null
    elif exists; then
      log "cluster '$name' exists but is not healthy: recreating it"
      cmd_down >/dev/null
    fi
    local owner; owner=$(port_owner "$port")
    [ -z "$owner" ] || die "port $port (kube-apiserver) is already in use by $owner: stop it, or set MODELFLEET_APISERVER_PORT to a free port"
    log "starting cluster '$name' (Kubernetes $KUBE_VERSION, kwok $KWOK_VERSION) on 127.0.0.1:$port"
    local out
    if ! out=$("$bin/kwokctl" create cluster --name "$name" --runtime binary \
        --kube-apiserver-port "$port" \
        --kube-apiserver-binary "$bin/kube-apiserver" \
        --kube-controller-manager-binary "$bin/kube-controller-manager" \
        --kube-scheduler-binary "$bin/kube-scheduler" \
        --kwok-controller-binary "$bin/kwok" \
        --etcd-binary "$bin/etcd" \
        --config "$stages" \
        --kubeconfig "$cdir.kubeconfig-merge" \
        --wait 120s 2>&1); then
      printf '%s\n' "$out" >&2
      if grep -qi 'address already in use' <<<"$out"; then
        die "a port that cluster '$name' needs is already in use: $(grep -oi '[0-9.]*:[0-9]*: bind: address already in use' <<<"$out" | head -1)"
      fi
      die "kwokctl could not create cluster '$name' (output above; logs in $cdir/logs)"
    fi
    echo "$stages_sum" > "$cdir/stages.sum"
  fi
  apply_fleet
  log "ready in $((SECONDS - t0))s; kubeconfig: $kubeconfig"
}

cluster_ports() {  # every port the cluster's components listen on, from kwokctl's own record
  [ -f "$cdir/kwok.yaml" ] || return 0
  grep -oE -- '(port|secure-port|node-port)=[0-9]+|:[0-9]{4,5}$|port: [0-9]+' "$cdir/kwok.yaml" | grep -oE '[0-9]+$' | sort -u
}

cmd_down() {
  local ports pids c
  ports=$(cluster_ports)
  pids=$(cat "$cdir"/pids/*.pid 2>/dev/null || true)
  if [ -d "$cdir" ]; then
    "$bin/kwokctl" delete cluster --name "$name" >/dev/null 2>&1 || true
  fi
  # kwokctl stops what it started; make sure nothing of ours outlives it.
  for c in $pids; do kill "$c" 2>/dev/null || true; done
  for c in $(seq 1 50); do
    local running=""; for p in $pids; do alive "$p" && running+=" $p"; done
    [ -z "$running" ] && break; sleep 0.1
  done
  for c in $pids; do kill -9 "$c" 2>/dev/null || true; done
  rm -rf "$cdir" "$cdir.kubeconfig-merge"
  local p owner left="" try
  for try in $(seq 1 50); do  # a listening socket can outlive its process by a moment
    left=""
    for p in $ports; do
      owner=$(port_owner "$p"); [ -z "$owner" ] || left+=" $p($owner)"
    done
    [ -z "$left" ] && break
    sleep 0.1
  done
  [ -z "$left" ] || die "ports still in use after cluster-down:$left"
  log "cluster '$name' is down"
}

cmd_status() {
  if ! exists; then
    echo "cluster '$name': not created (run 'make cluster-up')"
    return 1
  fi
  local c pid bad=0
  echo "cluster '$name' (Kubernetes $KUBE_VERSION, kwok $KWOK_VERSION), kubeconfig $kubeconfig"
  for c in "${components[@]}"; do
    pid=$(component_pid "$c")
    if [ -n "$pid" ]; then printf '  %-24s running (pid %s)\n' "$c" "$pid"
    else printf '  %-24s DEAD (see %s)\n' "$c" "$cdir/logs/$c.log"; bad=1; fi
  done
  if kctl get --raw /readyz >/dev/null 2>&1; then
    echo "  apiserver /readyz        ok (https://127.0.0.1:$port)"
    kctl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.compute.major,nvidia.com/gpu.compute.minor 2>/dev/null | sed 's/^/  /'
  else
    echo "  apiserver /readyz        NOT READY"; bad=1
  fi
  return $bad
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  kubeconfig) echo "$kubeconfig" ;;
  bin-dir) echo "$bin" ;;
  *) echo "usage: $0 up|down|status|kubeconfig|bin-dir" >&2; exit 2 ;;
esac

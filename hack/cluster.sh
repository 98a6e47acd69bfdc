#!/usr/bin/env bash
# The local cluster for tests and the demo: real Kubernetes binaries, KWOK's fake GPU nodes, and one real
# CPU node (containerd + kubelet + kube-proxy, see hack/node.sh; MODELFLEET_REAL_NODE=0 leaves it out and
# keeps fake CPU nodes instead).
# Usage: hack/cluster.sh up|down|status|kubeconfig
set -euo pipefail
# The daemons started from here must not inherit the caller's descriptors: a `flock LOCK make cluster-up`
# would otherwise stay locked by etcd and the apiserver for the cluster's whole life (bash reads this
# script on fd 255, which stays).
for fd in /proc/$$/fd/*; do
  fd=${fd##*/}
  if [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done
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
real_node=${MODELFLEET_REAL_NODE:-1}

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

# shellcheck source=node.sh
source "$here/node.sh"

stages="$here/kwok/config.yaml"

# kwokctl's own configuration. kube-controller-manager and kube-scheduler run without leader election:
# each is alone, and with it they exit as soon as they cannot renew their lease, i.e. whenever the
# apiserver restarts. kwok-controller manages only the fake nodes (annotation kwok.x-k8s.io/node=fake, see
# hack/fleet.py), never the real one. The real node adds its apiserver settings (hack/node.sh).
kwokctl_config() {
  cat <<EOF
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
EOF
  [ "$real_node" = 1 ] && node_kwokctl_options
  cat <<EOF
componentsPatches:
- name: kube-controller-manager
  extraArgs:
  - {key: leader-elect, value: "false"}
- name: kube-scheduler
  extraArgs:
  - {key: leader-elect, value: "false"}
- name: kwok-controller
  extraArgs:
  - {key: manage-all-nodes, value: "false", override: true}
  - {key: manage-nodes-with-annotation-selector, value: kwok.x-k8s.io/node=fake}
EOF
  [ "$real_node" = 1 ] && node_kwokctl_patches
  return 0
}

config_sum() {  # what the cluster was created from: a change recreates it
  { cat "$stages"; kwokctl_config; } | sha256sum | cut -c1-16
}
exists() { [ -f "$cdir/kwok.yaml" ]; }
current() { [ "$(cat "$cdir/stages.sum" 2>/dev/null)" = "$(config_sum)" ]; }

control_plane_healthy() {
  local c
  for c in "${components[@]}"; do [ -n "$(component_pid "$c")" ] || return 1; done
  kctl get --raw /readyz >/dev/null 2>&1
}

healthy() {
  control_plane_healthy || return 1
  [ "$real_node" = 1 ] || return 0
  node_healthy
}

ensure_binaries() {
  local c missing=0
  for c in kube-apiserver kube-controller-manager kube-scheduler kwok kwokctl etcd kubectl helm; do
    [ -s "$bin/$c" ] || missing=1
  done
  if [ "$real_node" = 1 ]; then
    for c in kubelet kube-proxy "local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION"; do [ -s "$bin/$c" ] || missing=1; done
  fi
  [ $missing -eq 0 ] || bash "$here/build-binaries.sh" >/dev/null
}

apply_fleet() {
  local args=("${MODELFLEET_FLEET_SCALE:-1}")
  [ "$real_node" = 1 ] && args+=(--no-cpu-nodes)  # the real node is the cpu architecture
  local fleet; fleet=$(python3 "$here/fleet.py" "${args[@]}")
  kctl apply -f - <<<"$fleet" >/dev/null
  # Fake nodes no longer in the fleet (the fake CPU nodes, once the real node is there) go.
  local n keep; keep=$(python3 -c 'import json,sys; print("\n".join(i["metadata"]["name"] for i in json.load(sys.stdin)["items"]))' <<<"$fleet")
  for n in $(kctl get nodes -l type=kwok -o name); do
    grep -qx "${n#node/}" <<<"$keep" || kctl delete "$n" --wait=false >/dev/null
  done
  local want; want=$(grep -c '"kind": "Node"' <<<"$fleet")
  [ "$real_node" = 1 ] && want=$((want + 1))
  local i
  for i in $(seq 1 60); do
    [ "$(kctl get nodes --no-headers 2>/dev/null | grep -cw Ready)" -ge "$want" ] && return 0
    sleep 1
  done
  die "the fake nodes did not become Ready within 60s: see 'hack/cluster.sh status' and $cdir/logs/kwok-controller.log"
}

create_cluster() {
  local owner; owner=$(port_owner "$port")
  [ -z "$owner" ] || die "port $port (kube-apiserver) is already in use by $owner: stop it, or set MODELFLEET_APISERVER_PORT to a free port"
  [ "$real_node" = 1 ] && node_prepare
  log "starting cluster '$name' (Kubernetes $KUBE_VERSION, kwok $KWOK_VERSION) on 127.0.0.1:$port"
  local out conf; conf=$(mktemp --suffix=.yaml)
  kwokctl_config > "$conf"
  if ! out=$("$bin/kwokctl" create cluster --name "$name" --runtime binary \
      --kube-apiserver-port "$port" \
      --kube-apiserver-binary "$bin/kube-apiserver" \
      --kube-controller-manager-binary "$bin/kube-controller-manager" \
      --kube-scheduler-binary "$bin/kube-scheduler" \
      --kwok-controller-binary "$bin/kwok" \
      --etcd-binary "$bin/etcd" \
      --config "$stages" --config "$conf" \
      --kubeconfig "$cdir.kubeconfig-merge" \
      --wait 120s 2>&1); then
    rm -f "$conf"
    printf '%s\n' "$out" >&2
    if grep -qi 'address already in use' <<<"$out"; then
      die "a port that cluster '$name' needs is already in use: $(grep -oi '[0-9.]*:[0-9]*: bind: address already in use' <<<"$out" | head -1)"
    fi
    die "kwokctl could not create cluster '$name' (output above; logs in $cdir/logs)"
  fi
  rm -f "$conf"
  config_sum > "$cdir/stages.sum"
}

repair_control_plane() {  # restarts only the dead components: the cluster's objects stay
  local c dead=()
  for c in "${components[@]}"; do
    # kwokctl takes a zombie for a running process: forget the pid of a dead one
    if [ -z "$(component_pid "$c")" ]; then dead+=("$c"); rm -f "$cdir/pids/$c.pid"; fi
  done
  log "cluster '$name': restarting ${dead[*]:-nothing (the apiserver was not ready)}"
  "$bin/kwokctl" start cluster --name "$name" >"$cdir/logs/kwokctl-start.log" 2>&1 \
    || die "kwokctl could not restart ${dead[*]} of cluster '$name': see $cdir/logs/kwokctl-start.log and $cdir/logs/"
  local i
  for i in $(seq 1 120); do control_plane_healthy && return 0; sleep 0.5; done
  die "cluster '$name' is still not healthy after restarting ${dead[*]}: see 'hack/cluster.sh status' and $cdir/logs/"
}

cmd_up() {
  local t0=$SECONDS
  ensure_binaries
  if exists && ! current; then
    log "hack/kwok/config.yaml or the cluster's settings changed since cluster '$name' was created: recreating it"
    cmd_down >/dev/null
  fi
  if exists && healthy; then
    log "cluster '$name' is already running"
  elif exists; then
    control_plane_healthy || repair_control_plane
  else
    [ ! -d "$cdir" ] || cmd_down >/dev/null  # a half-made cluster (no kwok.yaml)
    create_cluster
  fi
  if [ "$real_node" = 1 ]; then node_up; fi
  apply_fleet
  log "ready in $((SECONDS - t0))s; kubeconfig: $kubeconfig"
}

cluster_ports() {  # every port the cluster's components listen on, from kwokctl's own record
  [ -f "$cdir/kwok.yaml" ] || return 0
  grep -oE -- '(port|secure-port|node-port)=[0-9]+|:[0-9]{4,5}$|port: [0-9]+' "$cdir/kwok.yaml" | grep -oE '[0-9]+$' | sort -u
}

cmd_down() {
  local ports pids c
  node_down  # always: it finds the node's pieces from the cluster's name, even without its directory
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
  if [ "$real_node" = 1 ]; then node_status || bad=1; fi
  if kctl get --raw /readyz >/dev/null 2>&1; then
    echo "  apiserver /readyz        ok (https://127.0.0.1:$port)"
    kctl get nodes -L modelfleet.io/real-node,nvidia.com/gpu.product,nvidia.com/gpu.compute.major,nvidia.com/gpu.compute.minor 2>/dev/null | sed 's/^/  /'
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
  load-images) exists || die "cluster '$name' is not created"; node_load_project_images ;;
  *) echo "usage: $0 up|down|status|kubeconfig|bin-dir|load-images" >&2; exit 2 ;;
esac

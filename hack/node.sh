# shellcheck shell=bash
# The local cluster's one REAL node, beside the KWOK GPU fleet: containerd + kubelet + kube-proxy + a
# local-path provisioner, sourced by hack/cluster.sh (which defines name, port, cache, bin, cdir, kubeconfig,
# log, die, alive, kctl).
#
# Isolation: everything of the node lives in its own network namespace "modelfleet-<cluster>": the CNI
# bridge (its address is the node IP), the pods' veths, kube-proxy's KUBE-* chains and our firewall chain.
# So two clusters on one machine never share a chain, a bridge or an address, the host's own iptables are
# never touched, and deleting the namespace removes every rule at once. The host reaches the namespace over
# one veth pair: the host end's address is where the apiserver is advertised, the host routes the pod and
# Service ranges through it. The host does not forward (ip_forward stays as it is), the namespace has no
# default route, and its FORWARD chain lets pods reach only the pod range and the apiserver's port.
#
# Addresses, per cluster "slot" k (0..254, the first one free on this machine, kept in $nroot/slot):
#   pods      10.244.k.0/24   bridge 10.244.k.1 = node IP
#   services  10.96.k.0/24    the kubernetes Service is 10.96.k.1
#   link      10.243.k.0/30   host end .1 (apiserver advertise address), namespace end .2
#
# State: /var/lib/modelfleet/<cluster>/ holds containerd's root, state, socket, the pods' network namespaces
# (netns_mounts_under_state_dir), kubelet's root and pod logs, CNI's IPAM and the volumes. Configs, certs,
# pids and logs are in the kwokctl cluster directory. Pod cgroups live under /modelfleet-<cluster> in every
# cgroup v1 hierarchy (or the unified one).

node_components=(containerd kubelet kube-proxy local-path-provisioner)
nroot=/var/lib/modelfleet/$name
ndir="$cdir/node"
node_name="$name-cpu"
netns="modelfleet-$name"
# Interface and chain names are short: 5 characters of the name and 4 of its hash, unique per cluster.
tag="$(printf '%s' "$name" | tr -cd 'a-z0-9' | cut -c1-5)$(printf '%s' "$name" | sha256sum | cut -c1-4)"
bridge="mfb-$tag"
veth_host="mfh-$tag"
veth_node="mfn-$tag"
chain="MF-$tag"
cgroup_root="/modelfleet-$name"
ctr_sock="$nroot/containerd/containerd.sock"
cni_net="modelfleet-$name"
lpp_bin="$bin/local-path-provisioner-$LOCAL_PATH_PROVISIONER_VERSION"
node_packages=(containerd runc containernetworking-plugins iptables conntrack buildah busybox-static)

# ---------------------------------------------------------------------------------------------- addresses

node_slot() { cat "$nroot/slot" 2>/dev/null || true; }

node_addresses() {  # sets the address variables from the slot
  local k=$1
  pod_cidr="10.244.$k.0/24"; node_ip="10.244.$k.1"
  svc_cidr="10.96.$k.0/24"; kubernetes_ip="10.96.$k.1"
  link_cidr="10.243.$k.0/30"; api_ip="10.243.$k.1"; link_node_ip="10.243.$k.2"
}

node_allocate_slot() {  # the first slot whose ranges no route on this machine and no other cluster uses
  mkdir -p /var/lib/modelfleet "$nroot"
  local k routes claimed
  exec {lock}>/var/lib/modelfleet/.slots.lock
  flock "$lock"
  if [ -z "$(node_slot)" ]; then
    routes=$(ip -4 route show table all 2>/dev/null)
    claimed=$(cat /var/lib/modelfleet/*/slot 2>/dev/null || true)
    for k in $(seq 0 254); do
      grep -qx "$k" <<<"$claimed" && continue
      grep -qE "(^| )10\.(244|96|243)\.$k\.[0-9]+(/| )" <<<"$routes" && continue
      echo "$k" > "$nroot/slot"; break
    done
  fi
  exec {lock}>&-
  [ -n "$(node_slot)" ] || die "no free address slot for the real node (10.244.k.0/24 with k in 0..254 are all in use)"
  node_addresses "$(node_slot)"
}

# The parts of kwokctl's configuration the real node needs (hack/cluster.sh's kwokctl_config).
# The apiserver is advertised on the link's host end, so the kubernetes Service leads there from the pods.
node_kwokctl_options() {
  node_addresses "$(node_slot)"
  cat <<EOF
options:
  kubeApiserverCertSANs: ["$api_ip", "$kubernetes_ip"]
EOF
}

node_kwokctl_patches() {
  node_addresses "$(node_slot)"
  cat <<EOF
- name: kube-apiserver
  extraArgs:
  - {key: advertise-address, value: "$api_ip"}
  - {key: service-cluster-ip-range, value: "$svc_cidr"}
  - {key: kubelet-preferred-address-types, value: InternalIP}
  - {key: kubelet-client-certificate, value: "$cdir/pki/admin.crt"}
  - {key: kubelet-client-key, value: "$cdir/pki/admin.key"}
EOF
}

# ------------------------------------------------------------------------------------------------- host

node_ensure_packages() {
  local p missing=()
  for p in "${node_packages[@]}"; do
    [ "$(dpkg-query -W -f '${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "the real node needs ${missing[*]}: install them (Debian/Ubuntu package names), or set MODELFLEET_REAL_NODE=0"
  log "installing ${missing[*]} (apt-get)"
  local out="$cache/apt-install.log"; mkdir -p "$cache"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$out" 2>&1 \
    || die "apt-get could not install ${missing[*]}: see $out"
}

node_check_host() {
  [ "$(id -u)" = 0 ] || die "the real node needs root (containerd, kubelet, network namespaces): run as root, or set MODELFLEET_REAL_NODE=0"
  grep -qw overlay /proc/filesystems || die "the real node needs the overlay filesystem (containerd's overlayfs snapshotter)"
  [ -x "$lpp_bin" ] && [ -x "$bin/kubelet" ] && [ -x "$bin/kube-proxy" ] || bash "$here/build-binaries.sh" >/dev/null
}

nsx() { nsenter --net="/run/netns/$netns" -- "$@"; }  # run in the node's network namespace (host mounts)

node_network_up() {
  [ -e "/run/netns/$netns" ] || ip netns add "$netns"
  if ! ip link show "$veth_host" >/dev/null 2>&1; then
    ip link add "$veth_host" type veth peer name "$veth_node" netns "$netns"
    sysctl -qw "net.ipv6.conf.$veth_host.disable_ipv6=1"  # IPv4 only: no link-local path either
    ip addr add "$api_ip/30" dev "$veth_host"
    ip link set "$veth_host" up
  fi
  nsx ip link set lo up
  if ! nsx ip link show "$bridge" >/dev/null 2>&1; then
    nsx ip link add "$bridge" type bridge
    nsx ip addr add "$node_ip/24" dev "$bridge"
    nsx ip link set "$bridge" up
  fi
  if ! grep -q "$link_node_ip/" <<<"$(nsx ip -4 addr show dev "$veth_node")"; then
    nsx ip addr add "$link_node_ip/30" dev "$veth_node"
    nsx ip link set "$veth_node" up
  fi
  # The host reaches pods and ClusterIPs through the namespace (and an unknown ClusterIP never leaves
  # the machine by the default route).
  ip route replace "$pod_cidr" via "$link_node_ip" dev "$veth_host"
  ip route replace "$svc_cidr" via "$link_node_ip" dev "$veth_host"
  nsx sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 \
    net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  node_firewall
}

node_firewall() {  # pods reach other pods and the apiserver's port, nothing else (rules in the node's netns)
  if ! nsx iptables -w -S "$chain-FWD" >/dev/null 2>&1; then
    nsx iptables -w -N "$chain-FWD"
    nsx iptables -w -A "$chain-FWD" -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
    nsx iptables -w -A "$chain-FWD" -s "$pod_cidr" -d "$api_ip/32" -p tcp --dport "$port" -j RETURN
    nsx iptables -w -A "$chain-FWD" -s "$pod_cidr" ! -d "$pod_cidr" -j DROP
    nsx iptables -w -I FORWARD 1 -j "$chain-FWD"
  fi
  if ! nsx iptables -w -S "$chain-IN" >/dev/null 2>&1; then  # nor the node's own ports (kubelet, metrics)
    nsx iptables -w -N "$chain-IN"
    nsx iptables -w -A "$chain-IN" -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN
    nsx iptables -w -A "$chain-IN" -s "$pod_cidr" -j DROP
    nsx iptables -w -I INPUT 1 -j "$chain-IN"
  fi
}

node_cgroups_up() {  # kubelet's cgroupRoot must exist in every hierarchy
  local h d
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then mkdir -p "/sys/fs/cgroup$cgroup_root"; return 0; fi
  for h in /sys/fs/cgroup/*; do
    [ -d "$h" ] && [ ! -L "$h" ] || continue
    d="$h$cgroup_root"; mkdir -p "$d"
    # a cgroup v1 cpuset starts with no CPUs and no memory nodes: give it its parent's
    if [ -f "$d/cpuset.cpus" ] && [ -z "$(cat "$d/cpuset.cpus")" ]; then
      cat "$h/cpuset.cpus" > "$d/cpuset.cpus"; cat "$h/cpuset.mems" > "$d/cpuset.mems"
    fi
  done
}

# ------------------------------------------------------------------------------------------ certificates

node_cert() {  # name CN O: a client certificate signed by the cluster CA, once
  local crt="$ndir/$1.crt" key="$ndir/$1.key" subj="/CN=$2${3:+/O=$3}"
  [ -s "$crt" ] && return 0
  openssl req -new -newkey rsa:2048 -nodes -keyout "$key" -subj "$subj" -out "$ndir/$1.csr" 2>/dev/null
  openssl x509 -req -in "$ndir/$1.csr" -CA "$cdir/pki/ca.crt" -CAkey "$cdir/pki/ca.key" -CAcreateserial \
    -days 3650 -out "$crt" -extfile <(printf 'keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n') 2>/dev/null \
    || die "could not sign the $1 certificate with $cdir/pki/ca.key"
  rm -f "$ndir/$1.csr"
  chmod 600 "$key"
}

node_kubeconfig() {  # name: a kubeconfig for that certificate, pointing at the apiserver's link address
  cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: $name
  cluster: {server: "https://$api_ip:$port", certificate-authority: "$cdir/pki/ca.crt"}
users:
- name: $1
  user: {client-certificate: "$ndir/$1.crt", client-key: "$ndir/$1.key"}
contexts:
- name: $1
  context: {cluster: $name, user: $1}
current-context: $1
EOF
}

write_if_changed() {  # file: stdin becomes the file's content unless it already is (kube-proxy exits on a rewrite)
  local tmp; tmp=$(mktemp)
  cat > "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
  mv "$tmp" "$1"
}

# ------------------------------------------------------------------------------------------------ configs

node_configs() {
  mkdir -p "$ndir" "$nroot"/{containerd,kubelet,pod-logs,volumes,cni/net.d,cni/ipam}
  node_cert kubelet "system:node:$node_name" system:nodes
  node_cert kube-proxy system:kube-proxy
  node_kubeconfig kubelet | write_if_changed "$ndir/kubelet.kubeconfig" || true
  node_kubeconfig kube-proxy | write_if_changed "$ndir/kube-proxy.kubeconfig" || true
  pause_image=$(node_pause_image)

  write_if_changed "$ndir/containerd.toml" <<EOF || true
version = 2
root = "$nroot/containerd/root"
state = "$nroot/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$ctr_sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$nroot/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  # root here lacks CAP_SYS_RESOURCE: without this every sandbox fails ("can't get final child's PID from pipe")
  restrict_oom_score_adj = true
  # the pods' network namespaces under our state directory, not the machine's /run/netns
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nroot/cni/net.d"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$nroot/containerd/runc"
EOF

  # Pods get routes to the pod range, the Service range and the link (replies to the host), no default
  # route. containerd's CRI plugin sets up each pod's lo itself, with the loopback plugin from bin_dir.
  # containerd reloads this directory by itself; pods made before a change keep their old network.
  write_if_changed "$nroot/cni/net.d/10-$cni_net.conflist" <<EOF || true
{
  "cniVersion": "1.0.0",
  "name": "$cni_net",
  "plugins": [
    {
      "type": "bridge", "bridge": "$bridge", "isGateway": true, "isDefaultGateway": false,
      "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$nroot/cni/ipam",
        "ranges": [[{"subnet": "$pod_cidr", "gateway": "$node_ip"}]],
        "routes": [{"dst": "$svc_cidr"}, {"dst": "$link_cidr"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

  write_if_changed "$ndir/kubelet.yaml" <<EOF || true
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $node_ip
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$cdir/pki/ca.crt"}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: $cgroup_root
enforceNodeAllocatable: [pods]
containerRuntimeEndpoint: unix://$ctr_sock
failSwapOn: false
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
# Images are imported locally and cannot be pulled again: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
podLogsDir: $nroot/pod-logs
# No cluster DNS, and pods may not reach the machine's resolvers anyway.
resolvConf: ""
serializeImagePulls: false
EOF

  write_if_changed "$ndir/kube-proxy.yaml" <<EOF || true
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: "$ndir/kube-proxy.kubeconfig"}
hostnameOverride: $node_name
clusterCIDR: $pod_cidr
nodePortAddresses: ["$node_ip/32"]
# Every Service connection is masqueraded: replies then always return through the namespace's conntrack
# (pod to pod on one bridge, and the host reaching the apiserver through its ClusterIP).
iptables: {masqueradeAll: true, syncPeriod: 10s, minSyncPeriod: 1s}
# Leave the machine's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
EOF
}

# ------------------------------------------------------------------------------------------------- images

node_pause_image() {  # MODELFLEET_PAUSE_IMAGE, else hack/images.sh's pause=, else the one used before
  local ref=${MODELFLEET_PAUSE_IMAGE:-}
  if [ -z "$ref" ] && [ -f "$here/images.sh" ]; then
    ref=$(bash "$here/images.sh" refs 2>/dev/null | sed -n 's/^pause=//p' | head -1)
  fi
  [ -n "$ref" ] || ref=$(cat "$ndir/pause-image" 2>/dev/null || true)
  [ -n "$ref" ] || ref=localhost/modelfleet/pause:latest
  echo "$ref" > "$ndir/pause-image"
  echo "$ref"
}

ctr_() { ctr --address "$ctr_sock" -n k8s.io "$@"; }
# (no 'cmd | grep -q' under pipefail: grep's early exit fails the pipeline with SIGPIPE)
has_image() { grep -qxF "$1" <<<"$(ctr_ images ls -q 2>/dev/null)"; }

# The local-path helper pod's image: busybox from Debian's busybox-static, cached as a tar keyed by its inputs.
helper_applets=(sh mkdir rm rmdir chmod ls cat)
node_helper_image() {
  local recipe="busybox-static $(sha256sum /bin/busybox | cut -c1-64) ${helper_applets[*]} v1"
  local key; key=$(printf '%s' "$recipe" | sha256sum | cut -c1-12)
  helper_ref="localhost/modelfleet/local-path-helper:$key"
  helper_tar="$cache/images/local-path-helper-$key.tar"
  [ -s "$helper_tar" ] && return 0
  log "building the local-path helper image ($helper_ref) from /bin/busybox"
  mkdir -p "$cache/images"
  local ctx; ctx=$(mktemp -d); mkdir -p "$ctx/bin"
  cp /bin/busybox "$ctx/bin/busybox"
  local a; for a in "${helper_applets[@]}"; do ln -s busybox "$ctx/bin/$a"; done
  local out="$cdir/logs/helper-image-build.log" c
  {
    c=$(buildah from scratch) &&
    buildah copy "$c" "$ctx/bin" /bin &&
    buildah config --env PATH=/bin --cmd '["/bin/sh"]' "$c" &&
    buildah commit -q --rm "$c" "$helper_ref" &&
    buildah push -q "$helper_ref" "docker-archive:$helper_tar.tmp:$helper_ref" &&
    mv "$helper_tar.tmp" "$helper_tar" &&
    buildah rmi "$helper_ref"
  } >"$out" 2>&1 || { rm -rf "$ctx" "$helper_tar.tmp"; die "could not build the local-path helper image: see $out"; }
  rm -rf "$ctx"
}

node_load_project_images() {  # the pause image (built here: no pod starts without it), and the project's
  [ -f "$here/images.sh" ] || return 0  # images when `make images` built them; what the node holds is skipped
  bash "$here/images.sh" build pause >"$cdir/logs/images-build.log" 2>&1 \
    || die "could not build the pause image: see $cdir/logs/images-build.log"
  bash "$here/images.sh" load "$ctr_sock" >"$cdir/logs/images-load.log" 2>&1 \
    || die "hack/images.sh load failed: see $cdir/logs/images-load.log"
  grep -q "not built" "$cdir/logs/images-load.log" && log "$(grep 'not built' "$cdir/logs/images-load.log" | head -1)"
  return 0
}

node_import_images() {
  local tar ref refs
  has_image "$helper_ref" || ctr_ images import "$helper_tar" >/dev/null || die "could not import $helper_tar into the node's containerd (log: $cdir/logs/containerd.log)"
  for tar in ${MODELFLEET_NODE_IMAGE_TARS:-}; do
    [ -s "$tar" ] || die "MODELFLEET_NODE_IMAGE_TARS names $tar, which does not exist"
    ref=$(tar -xOf "$tar" manifest.json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(t for m in json.load(sys.stdin) for t in (m.get("RepoTags") or [])))' || true)
    local missing=0 r; for r in $ref; do has_image "docker.io/$r" || has_image "$r" || missing=1; done
    [ -n "$ref" ] && [ $missing -eq 0 ] && continue
    ctr_ images import "$tar" >/dev/null || die "could not import $tar into the node's containerd"
  done
  node_load_project_images
  has_image "$pause_image" \
    || log "warning: the pause image $pause_image is not in the node's containerd: pods cannot start on $node_name (provide it with hack/images.sh, or MODELFLEET_PAUSE_IMAGE plus MODELFLEET_NODE_IMAGE_TARS)"
}

# ---------------------------------------------------------------------------------------------- processes

node_pid() { component_pid "$1"; }

node_start() {  # component [--netns] command...: start it detached unless it runs, log to logs/<component>.log
  local c=$1; shift
  local in_ns=0; [ "$1" = --netns ] && { in_ns=1; shift; }
  [ -n "$(node_pid "$c")" ] && return 0
  mkdir -p "$cdir/logs" "$cdir/pids"
  if [ $in_ns = 1 ]; then
    setsid nsenter --net="/run/netns/$netns" -- "$@" >>"$cdir/logs/$c.log" 2>&1 </dev/null &
  else
    setsid "$@" >>"$cdir/logs/$c.log" 2>&1 </dev/null &
  fi
  echo $! > "$cdir/pids/$c.pid"
  node_config_sum "$c" > "$ndir/$c.config-sum"
  log "started $c (pid $!, log $cdir/logs/$c.log)"
}

wait_for() {  # seconds what-for log command...: poll until the command succeeds
  local secs=$1 what=$2 logf=$3 i; shift 3
  for i in $(seq 1 $((secs * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what within ${secs}s: see $logf"
}

node_config_sum() {  # what a component reads at start
  case $1 in
    containerd) cat "$ndir/containerd.toml" ;;
    kubelet) cat "$ndir/kubelet.yaml" "$ndir/kubelet.kubeconfig" ;;
    kube-proxy) cat "$ndir/kube-proxy.yaml" "$ndir/kube-proxy.kubeconfig" ;;
    local-path-provisioner) printf '%s' "$helper_ref" ;;  # its helper pod comes from the ConfigMap, read once
  esac | sha256sum | cut -c1-16
}

node_restart_changed() {  # a running component started from other configuration files restarts
  local c p                # (kube-proxy would exit by itself, and might not have yet)
  for c in "${node_components[@]}"; do
    p=$(node_pid "$c"); [ -n "$p" ] || continue
    [ "$(cat "$ndir/$c.config-sum" 2>/dev/null)" = "$(node_config_sum "$c")" ] && continue
    log "$c's configuration changed since it started: restarting it"
    kill_wait "$p"
  done
}

node_containerd_up() {
  node_start containerd --netns containerd --config "$ndir/containerd.toml"
  wait_for 30 "containerd did not answer on $ctr_sock" "$cdir/logs/containerd.log" ctr --address "$ctr_sock" version
}

node_kubelet_up() {
  node_start kubelet --netns "$bin/kubelet" --config "$ndir/kubelet.yaml" --kubeconfig "$ndir/kubelet.kubeconfig" \
    --root-dir "$nroot/kubelet" --cert-dir "$nroot/kubelet/pki" --node-ip "$node_ip" --hostname-override "$node_name" \
    --node-labels "modelfleet.io/real-node=true" --v=1
}

node_proxy_up() {
  node_start kube-proxy --netns "$bin/kube-proxy" --config "$ndir/kube-proxy.yaml" --v=1
}

node_ready() {
  [ "$(kctl get node "$node_name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# --------------------------------------------------------------------------------------------- storage

node_storage_objects() {
  local ns=local-path-storage
  cat <<EOF
{"apiVersion": "v1", "kind": "List", "items": [
 {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "$ns"}},
 {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "local-path-provisioner", "namespace": "$ns"}},
 {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "local-path-config", "namespace": "$ns"}, "data": {
   "config.json": $(printf '{"nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": ["%s"]}]}' "$nroot/volumes" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))'),
   "setup": "#!/bin/sh\nset -eu\nmkdir -m 0777 -p \"\$VOL_DIR\"\n",
   "teardown": "#!/bin/sh\nset -eu\nrm -rf \"\$VOL_DIR\"\n",
   "helperPod.yaml": "apiVersion: v1\nkind: Pod\nmetadata:\n  name: helper-pod\nspec:\n  priorityClassName: system-node-critical\n  tolerations:\n  - {key: node.kubernetes.io/disk-pressure, operator: Exists, effect: NoSchedule}\n  containers:\n  - name: helper-pod\n    image: $helper_ref\n    imagePullPolicy: Never\n"}},
 {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
  "metadata": {"name": "local-path", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
  "provisioner": "rancher.io/local-path", "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Delete"}
]}
EOF
}

node_storage_up() {
  # Applied only when missing: a second 'up' changes nothing (the helper image's hash is in the ConfigMap).
  if ! grep -qF "$helper_ref" <<<"$(kctl -n local-path-storage get configmap local-path-config -o jsonpath='{.data.helperPod\.yaml}' 2>/dev/null)" \
      || ! kctl get storageclass local-path >/dev/null 2>&1; then
    node_storage_objects | kctl apply -f - >/dev/null || die "could not create the local-path StorageClass and its ConfigMap"
  fi
  chmod 0755 "$nroot/volumes"
  node_start local-path-provisioner "$lpp_bin" start --kubeconfig "$kubeconfig" --namespace local-path-storage \
    --configmap-name local-path-config --service-account-name local-path-provisioner \
    --provisioner-name rancher.io/local-path --helper-image "$helper_ref"
}

# ------------------------------------------------------------------------------------------- lifecycle

node_prepare() {  # before kwokctl create: packages, binaries, images, the address slot
  node_ensure_packages
  node_check_host
  node_allocate_slot
}

node_up() {  # idempotent: starts what is not running, rewrites only what changed
  local t0=$SECONDS
  node_addresses "$(node_slot)"
  node_helper_image
  node_network_up
  node_cgroups_up
  node_configs
  node_restart_changed
  node_containerd_up
  node_import_images
  node_kubelet_up
  node_proxy_up
  wait_for 60 "node $node_name did not become Ready" "$cdir/logs/kubelet.log" node_ready
  node_storage_up
  log "real node $node_name Ready (node IP $node_ip, pods $pod_cidr, Services $svc_cidr) in $((SECONDS - t0))s"
}

node_healthy() {
  local c
  for c in "${node_components[@]}"; do [ -n "$(node_pid "$c")" ] || return 1; done
  [ -e "/run/netns/$netns" ] && node_ready
}

node_status() {  # one line per component, like the control plane's; returns 1 when one is dead
  local c pid bad=0
  for c in "${node_components[@]}"; do
    pid=$(node_pid "$c")
    if [ -n "$pid" ]; then printf '  %-24s running (pid %s)\n' "$c" "$pid"
    else printf '  %-24s DEAD (see %s)\n' "$c" "$cdir/logs/$c.log"; bad=1; fi
  done
  if [ -n "$(node_slot)" ]; then
    node_addresses "$(node_slot)"
    printf '  %-24s %s, node IP %s, pods %s, Services %s\n' "node $node_name" \
      "$(node_ready && echo Ready || echo NOT READY)" "$node_ip" "$pod_cidr" "$svc_cidr"
    node_ready || bad=1
  fi
  return $bad
}

# ---------------------------------------------------------------------------------------------- teardown

kill_wait() {  # pids...: TERM, up to 5 s, then KILL
  local p i left
  [ $# -gt 0 ] || return 0
  kill "$@" 2>/dev/null || true
  for i in $(seq 1 50); do
    left=""; for p in "$@"; do alive "$p" && left+=" $p"; done
    [ -z "$left" ] && return 0
    sleep 0.1
  done
  # shellcheck disable=SC2086
  kill -9 $left 2>/dev/null || true
}

cgroup_dirs() {  # every cgroup directory of the pods, deepest first
  local h
  for h in /sys/fs/cgroup /sys/fs/cgroup/*; do
    if [ ! -L "$h" ] && [ -d "$h$cgroup_root" ]; then find "$h$cgroup_root" -depth -type d; fi
  done
}

shim_pids() {  # containerd's shims for OUR socket (found by their exact -address argument)
  local f
  for f in /proc/[0-9]*/cmdline; do
    grep -qF -- "-address $ctr_sock " <<<"$(tr '\0' ' ' 2>/dev/null <"$f")" && { f=${f#/proc/}; echo "${f%/cmdline}"; }
  done
  return 0
}

node_down() {  # stops and removes everything of the node, also when the cluster directory is gone
  local c pids="" d p
  # Shim sockets live in containerd's fixed /run/containerd/s/; each task's bundle records its own.
  local sockets; sockets=$(cat "$nroot"/containerd/state/io.containerd.runtime.v2.task/*/*/address 2>/dev/null | sed 's|^unix://||' || true)
  for c in kubelet kube-proxy local-path-provisioner; do p=$(node_pid "$c"); [ -n "$p" ] && pids+=" $p"; done
  # shellcheck disable=SC2086
  kill_wait $pids
  # The pods' processes: everything in the pods' cgroups.
  pids=$(cgroup_dirs | while read -r d; do cat "$d/cgroup.procs" 2>/dev/null; done | sort -u)
  # shellcheck disable=SC2086
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  p=$(node_pid containerd); [ -z "$p" ] || kill_wait "$p"
  # shellcheck disable=SC2046
  kill_wait $(shim_pids)
  # Anything still in the node's network namespace is ours (only this script puts processes there).
  if [ -e "/run/netns/$netns" ]; then
    # shellcheck disable=SC2046
    kill_wait $(ip netns pids "$netns" 2>/dev/null)
  fi
  # Mounts: kubelet's volumes, containerd's overlays and shm, the pods' netns; deepest first.
  local m
  for m in $(awk -v r="$nroot/" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "warning: could not unmount $m"
  done
  [ ! -e "/run/netns/$netns" ] || ip netns del "$netns" 2>/dev/null || log "warning: could not delete network namespace $netns"
  ip link del "$veth_host" 2>/dev/null || true  # gone with the namespace; this is for a half-made one
  cgroup_dirs | while read -r d; do rmdir "$d" 2>/dev/null || log "warning: could not remove cgroup $d"; done
  for p in $sockets; do rm -f "$p"; done
  for p in /var/log/containers/*.log; do
    [ -L "$p" ] && case "$(readlink "$p")" in "$nroot"/*) rm -f "$p" ;; esac
  done
  # libcni caches each pod's result in the machine's /var/lib/cni/results (containerd 1.6 cannot move it):
  # our network's entries, and the loopback entries of the same sandboxes.
  local f id
  for f in /var/lib/cni/results/"$cni_net"-*; do
    [ -e "$f" ] || continue
    id=${f#/var/lib/cni/results/"$cni_net"-}; id=${id%-eth0}
    rm -f "$f" "/var/lib/cni/results/cni-loopback-$id-lo"
  done
  rm -rf "$nroot"
  node_machine_dirs_down
  for c in "${node_components[@]}"; do rm -f "$cdir/pids/$c.pid"; done
}

node_machine_dirs_down() {  # the machine-wide directories a node creates, once no other cluster's node needs them
  [ -d /var/lib/modelfleet ] || return 0
  exec {lock}>/var/lib/modelfleet/.slots.lock
  flock "$lock"
  if [ -z "$(ls -A /var/lib/modelfleet | grep -vx .slots.lock)" ]; then
    # kubelet's device-plugin socket is fixed (/var/lib/kubelet/device-plugins/kubelet.sock)
    rm -f /var/lib/kubelet/device-plugins/kubelet.sock
    rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet /var/lib/cni/results /var/lib/cni \
      /run/containerd/s /run/containerd /var/log/containers 2>/dev/null || true  # each only when empty
    rm -f /var/lib/modelfleet/.slots.lock; rmdir /var/lib/modelfleet 2>/dev/null || true
  fi
  exec {lock}>&-
}

#!/usr/bin/env bash
# `make demo`: the modelfleet story on the local cluster, step by step.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. A local Kubernetes cluster: real kube-apiserver, controller-manager and scheduler; KWOK nodes"
bash hack/cluster.sh up
bin=$(bash hack/cluster.sh bin-dir)
export KUBECONFIG=$(bash hack/cluster.sh kubeconfig)
kubectl() { "$bin/kubectl" "$@"; }

step "2. The GPU fleet, as GPU Feature Discovery labels it"
kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.compute.major,nvidia.com/gpu.compute.minor,nvidia.com/gpu.count
echo
echo "Point kubectl at it:  export KUBECONFIG=\$(make -s cluster-kubeconfig)"

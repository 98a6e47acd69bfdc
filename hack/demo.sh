#!/usr/bin/env bash
# `make demo`: the modelfleet story on the local cluster, step by step, then the runtime for real.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py="$root/.venv/bin/python"
ns=${MODELFLEET_DEMO_NAMESPACE:-demo}
work=$(mktemp -d)
op_pid=""; serve_pid=""
cleanup() {
  [ -n "$op_pid" ] && kill "$op_pid" 2>/dev/null || true
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }

step "1. A local Kubernetes cluster: real kube-apiserver, controller-manager and scheduler; KWOK nodes and pods"
bash hack/cluster.sh up
bin=$(bash hack/cluster.sh bin-dir)
export KUBECONFIG=$(bash hack/cluster.sh kubeconfig)
export PATH="$bin:$PATH"

step "2. The GPU fleet, as GPU Feature Discovery labels it"
show kubectl get nodes -L nvidia.com/gpu.product,nvidia.com/gpu.compute.major,nvidia.com/gpu.compute.minor,nvidia.com/gpu.count

step "3. The platform team installs modelfleet with Helm (CRD, least-privilege RBAC, operator Deployment)"
show helm upgrade --install modelfleet helm/modelfleet --namespace modelfleet-system --create-namespace --wait
kubectl wait --for=condition=Established --timeout=60s crd/inferencemodels.modelfleet.io >/dev/null
for _ in $(seq 1 120); do  # a new CRD reaches the OpenAPI a moment after it is Established
  kubectl explain inferencemodel.spec >/dev/null 2>&1 && break
  sleep 0.5
done
show kubectl explain inferencemodel.spec.engine.batch

step "4. The operator runs here as a process, authenticated as the chart's ServiceAccount (KWOK pods run nothing)"
token=$(kubectl -n modelfleet-system create token modelfleet --duration=1h)
"$py" hack/sa_kubeconfig.py "$KUBECONFIG" "$token" "$work/kubeconfig"
KUBECONFIG="$work/kubeconfig" MODELFLEET_OPERATOR_AUTOSCALE_INTERVAL_SECONDS=5 \
  "$root/.venv/bin/modelfleet" operator --liveness-port=0 > "$work/operator.log" 2>&1 &
op_pid=$!
echo "operator pid $op_pid, log $work/operator.log"

step "5. An ML team's namespace: an engine store and a models volume"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
"$py" hack/volumes.py "$ns" modelfleet-engines models | kubectl apply -f - >/dev/null
show kubectl -n "$ns" get pvc

step "6. kubectl apply an InferenceModel: one build Job per GPU architecture, pinned to it"
show kubectl -n "$ns" apply -f examples/minimal.yaml
sleep 3
show kubectl -n "$ns" get jobs -L modelfleet.io/architecture
show kubectl -n "$ns" wait --for=condition=Ready --timeout=120s inferencemodel/minilm
show kubectl -n "$ns" get inferencemodels
show kubectl -n "$ns" get deployments -L modelfleet.io/architecture

step "7. A new precision: engines are built first; the serving Deployments roll only when they are Ready"
show kubectl -n "$ns" patch inferencemodel minilm --type=merge -p '{"spec":{"engine":{"precision":"fp32"}}}'
sleep 2
show kubectl -n "$ns" get jobs -L modelfleet.io/architecture
kubectl -n "$ns" wait --for=jsonpath='{.status.engineSummary}'=4/4 --timeout=120s inferencemodel/minilm >/dev/null
kubectl -n "$ns" wait --for=condition=Progressing=False --timeout=120s inferencemodel/minilm >/dev/null
show kubectl -n "$ns" get inferencemodels
show kubectl -n "$ns" get deployments -o custom-columns='NAME:.metadata.name,ENGINE:.metadata.annotations.modelfleet\.io/engine-key,REPLICAS:.spec.replicas'

step "8. kubectl scale works (the scale subresource); replicas are split across architectures"
show kubectl -n "$ns" scale inferencemodel/minilm --replicas=6
sleep 3
show kubectl -n "$ns" get deployments -L modelfleet.io/architecture
show kubectl -n "$ns" get events --field-selector involvedObject.kind=InferenceModel --sort-by=.lastTimestamp

step "9. The runtime for real: modelfleet build (ONNX Runtime path, accuracy-gated) and modelfleet serve"
"$py" -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from tests.modelzoo import classifier_model; classifier_model(Path('$work/classifier.onnx'))"
show "$root/.venv/bin/modelfleet" build --model "$work/classifier.onnx" --store "$work/store" --architecture cpu --precision int8 --termination-log "$work/result.json"
key=$("$py" -c "import json; print(json.load(open('$work/result.json'))['key'])")
"$root/.venv/bin/modelfleet" serve --model "$work/store/$key" --name classifier --http-port 0 --host 127.0.0.1 > "$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 1 120); do
  port=$(grep -oE 'listening on http://[^:]+:[0-9]+' "$work/serve.log" | grep -oE '[0-9]+$' || true)
  [ -n "$port" ] && curl -fs "http://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1 && break
  sleep 0.5
done
show curl -s "http://127.0.0.1:$port/v2/models/classifier"
echo
show curl -s -X POST "http://127.0.0.1:$port/v2/models/classifier/infer" -H 'Content-Type: application/json' \
  -d '{"inputs":[{"name":"input","shape":[2,16],"datatype":"FP32","data":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4,1.5,1.6,1.6,1.5,1.4,1.3,1.2,1.1,1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1]}]}'
echo
curl -s "http://127.0.0.1:$port/metrics" | grep -E '^modelfleet_(requests_total|batch_size_count)' || true

step "Done"
echo "The cluster keeps running: export KUBECONFIG=\$(make -s cluster-kubeconfig); 'make cluster-down' stops it."

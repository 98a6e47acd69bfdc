#!/usr/bin/env bash
# `make demo`: the modelfleet story on the local cluster, for real: the project's images, the operator installed
# by Helm inside the cluster, a real build and real serving pods on the real node, the KWOK GPU fleet beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py="$root/.venv/bin/python"
ns=${MODELFLEET_DEMO_NAMESPACE:-demo}
work=$(mktemp -d)
load_pid=""
cleanup() {
  [ -n "$load_pid" ] && kill "$load_pid" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }

step "1. A local Kubernetes cluster: real control plane, one real node (containerd + kubelet), a KWOK GPU fleet"
bash hack/cluster.sh up
bin=$(bash hack/cluster.sh bin-dir)
export KUBECONFIG=$(bash hack/cluster.sh kubeconfig)
export PATH="$bin:$PATH"
show kubectl get nodes -L modelfleet.io/real-node,nvidia.com/gpu.product,nvidia.com/gpu.compute.major,nvidia.com/gpu.compute.minor

step "2. The project's images, built without a registry and loaded into the real node (make images)"
bash hack/images.sh build
bash hack/cluster.sh load-images
refs=$(bash hack/images.sh refs); echo "$refs"
operator_ref=$(sed -n 's/^operator=//p' <<<"$refs"); runtime_ref=$(sed -n 's/^runtime=//p' <<<"$refs")
operator_hash=$(bash hack/images.sh hashes | sed -n 's/^operator=//p')

step "3. The platform team installs modelfleet with Helm: the operator runs in the cluster, from its image"
# The chart renders the CRD (templates/crd.yaml), so install and upgrade both apply it. --take-ownership and
# --force-conflicts hand Helm a CRD that `kubectl apply` or an older chart (one with crds/) created first.
show helm upgrade --install modelfleet helm/modelfleet --namespace modelfleet-system --create-namespace \
  --take-ownership --force-conflicts --values hack/local-values.yaml \
  --set "image.repository=${operator_ref%:*},image.tag=${operator_ref##*:}" \
  --set "runtime.image.repository=${runtime_ref%:*},runtime.image.tag=${runtime_ref##*:}" \
  --set "podAnnotations.modelfleet\.io/operator-image=$operator_hash" --wait --timeout 300s
kubectl wait --for=condition=Established --timeout=60s crd/inferencemodels.modelfleet.io >/dev/null
show kubectl -n modelfleet-system get pods -o wide

step "4. An ML team's namespace (Pod Security 'restricted'): an engine store and a models volume (default StorageClass)"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl label --overwrite namespace "$ns" pod-security.kubernetes.io/enforce=restricted >/dev/null
for claim in modelfleet-engines models; do
  kubectl -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $claim}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
YAML
done
"$py" -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from tests.modelzoo import classifier_model; classifier_model(Path('$work/classifier.onnx'))"
kubectl -n "$ns" delete pod copy-model --ignore-not-found --wait=true >/dev/null
kubectl -n "$ns" apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Pod
metadata: {name: copy-model}
spec:
  restartPolicy: Never
  securityContext: {runAsNonRoot: true, runAsUser: 65532, fsGroup: 65532, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: copy
    image: $runtime_ref
    imagePullPolicy: Never
    command: [python, -c, "import time; time.sleep(600)"]
    securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
    volumeMounts: [{name: models, mountPath: /models}]
  volumes: [{name: models, persistentVolumeClaim: {claimName: models}}]
YAML
kubectl -n "$ns" wait --for=condition=Ready --timeout=180s pod/copy-model >/dev/null
kubectl -n "$ns" exec -i copy-model -- python -c "import sys; open('/models/classifier.onnx', 'wb').write(sys.stdin.buffer.read())" < "$work/classifier.onnx"
kubectl -n "$ns" delete pod copy-model --wait=true >/dev/null
show kubectl -n "$ns" get pvc

step "5. kubectl apply an InferenceModel for the CPU: a real 'modelfleet build' Job, then a serving pod"
cat > "$work/classifier.yaml" <<'YAML'
apiVersion: modelfleet.io/v1alpha1
kind: InferenceModel
metadata: {name: classifier}
spec:
  model: {uri: pvc://models/classifier.onnx}
  engine: {precision: fp32}
  serving: {resources: {gpu: 0, cpu: 200m, memory: 768Mi}}
YAML
show kubectl -n "$ns" apply -f "$work/classifier.yaml"
sleep 3
show kubectl -n "$ns" get jobs,pods -o wide
show kubectl -n "$ns" wait --for=condition=Ready --timeout=600s inferencemodel/classifier
show kubectl -n "$ns" get inferencemodels
show kubectl -n "$ns" logs job/"$(kubectl -n "$ns" get jobs -l modelfleet.io/model=classifier -o jsonpath='{.items[0].metadata.name}')"

step "6. Query the model through its Service: curl (OIP v2 JSON) and NVIDIA's tritonclient"
ip=$(kubectl -n "$ns" get service classifier -o jsonpath='{.spec.clusterIP}')
show curl -s "http://$ip/v2/models/classifier"
echo
show curl -s -X POST "http://$ip/v2/models/classifier/infer" -H 'Content-Type: application/json' \
  -d '{"inputs":[{"name":"input","shape":[1,16],"datatype":"FP32","data":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4,1.5,1.6]}]}'
echo
show "$py" hack/demo_client.py infer "$ip:80"

step "7. kubectl scale: three real serving pods behind the Service"
show kubectl -n "$ns" scale inferencemodel/classifier --replicas=3
kubectl -n "$ns" wait --for=jsonpath='{.status.readyReplicas}'=3 --timeout=300s inferencemodel/classifier >/dev/null
show kubectl -n "$ns" get pods -l modelfleet.io/component=serving -o wide

step "8. A spec change that needs a new engine, under steady load through the Service"
"$py" hack/demo_client.py load "$ip:80" "$work/stop" > "$work/load.log" 2>&1 &
load_pid=$!
old_key=$(kubectl -n "$ns" get inferencemodel classifier -o jsonpath='{.status.engines[0].key}')
show kubectl -n "$ns" patch inferencemodel classifier --type=merge -p '{"spec":{"engine":{"batch":{"max":16}}}}'
for _ in $(seq 1 300); do
  key=$(kubectl -n "$ns" get inferencemodel classifier -o jsonpath='{.status.engines[0].key}')
  reconciling=$(kubectl -n "$ns" get inferencemodel classifier -o jsonpath='{.status.conditions[?(@.type=="Reconciling")].status}')
  ready=$(kubectl -n "$ns" get inferencemodel classifier -o jsonpath='{.status.readyReplicas}')
  [ "$key" != "$old_key" ] && [ "$reconciling" = False ] && [ "$ready" = 3 ] && break
  sleep 2
done
sleep 3
touch "$work/stop"; wait "$load_pid" || true; load_pid=""
cat "$work/load.log"
show kubectl -n "$ns" get inferencemodels
show kubectl -n "$ns" get events --field-selector involvedObject.kind=InferenceModel --sort-by=.lastTimestamp

step "9. The same operator plans a GPU model across the KWOK GPU fleet: one build Job per architecture"
kubectl create namespace "$ns-gpu" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
"$py" hack/volumes.py "$ns-gpu" modelfleet-engines models | kubectl apply -f - >/dev/null
show kubectl -n "$ns-gpu" apply -f examples/minimal.yaml
show kubectl -n "$ns-gpu" wait --for=condition=Ready --timeout=180s inferencemodel/minilm
show kubectl -n "$ns-gpu" get jobs,deployments -L modelfleet.io/architecture

step "Done"
echo "The cluster keeps running: export KUBECONFIG=\$(make -s cluster-kubeconfig); 'make cluster-down' stops it."

"""PersistentVolumeClaims bound to pre-made PersistentVolumes: no provisioner runs in the local cluster.

Usage: volumes.py NAMESPACE CLAIM [CLAIM ...]  (prints a v1 List to pipe into `kubectl apply -f -`)
"""

from __future__ import annotations

import json
import sys
from typing import Any


def bound_pvc_objects(namespace: str, claim: str, size: str = "10Gi") -> list[dict[str, Any]]:
    """A hostPath PV pre-bound to `namespace/claim` (claimRef), and the claim that binds to it at once."""
    pv = f"{namespace}-{claim}"[:63]
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv, "labels": {"modelfleet.io/local-cluster": "true"}},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "manual",
                "persistentVolumeReclaimPolicy": "Delete",
                "hostPath": {"path": f"/tmp/modelfleet-volumes/{pv}"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "manual",
                "volumeName": pv,
                "resources": {"requests": {"storage": size}},
            },
        },
    ]


def main(argv: list[str]) -> int:
    namespace, claims = argv[0], argv[1:]
    items = [obj for claim in claims for obj in bound_pvc_objects(namespace, claim)]
    print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

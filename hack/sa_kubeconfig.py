"""Writes a kubeconfig that authenticates as a ServiceAccount's token, so a local process gets exactly its RBAC.

Usage: sa_kubeconfig.py ADMIN_KUBECONFIG TOKEN OUT  (the cluster entry is copied from the admin kubeconfig)
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml


def service_account_kubeconfig(admin_kubeconfig: Path, token: str, out: Path, user: str = "service-account") -> Path:
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c for c in admin["clusters"] if c["name"] == context["context"]["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "sa",
        "clusters": [{"name": "local", "cluster": cluster["cluster"]}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": user}}],
    }
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o600)
    return out


if __name__ == "__main__":
    service_account_kubeconfig(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))

"""Operator settings: one pydantic-settings class, built once in `main()` and passed down explicitly."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    """How the operator builds its children; every field can be set as MODELFLEET_OPERATOR_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="MODELFLEET_OPERATOR_", frozen=True)

    runtime_image: str = Field(
        "ghcr.io/modelfleet/modelfleet-runtime:0.1.0",
        description="Image of build Jobs and serving pods when spec.serving.image is unset.",
    )
    image_pull_policy: str = Field("IfNotPresent", description="Pull policy of that image.")
    runtime_backend_versions: dict[str, str] = Field(
        default_factory=dict,
        description='Backend versions inside runtime_image, e.g. {"tensorrt": "10.3.0"}: with them (and a '
        "pinned model sha256) the operator knows an engine's cache key before its build runs.",
    )
    engine_store_claim: str = Field(
        "modelfleet-engines",
        description="PersistentVolumeClaim, in each InferenceModel's namespace, holding the engine store.",
    )
    engine_store_path: str = Field("/var/lib/modelfleet/engines", description="Mount path of the engine store.")
    models_path: str = Field("/models", description="Where pvc:// model volumes are mounted: <path>/<claim>.")
    serving_port: int = Field(8080, ge=1, le=65535, description="HTTP port of the runtime in serving pods.")
    serving_grpc_port: int = Field(
        8081, ge=0, le=65535, description="OIP v2 gRPC port of the runtime in serving pods (0 = REST only)."
    )
    build_backoff_limit: int = Field(1, ge=0, description="Retries of a build pod that failed for a transient reason.")
    build_active_deadline_seconds: int = Field(7200, ge=60, description="A build running longer is failed.")
    build_ttl_seconds_after_finished: int = Field(
        86400, ge=0, description="Finished build Jobs are removed after this."
    )
    build_cpu: str = Field("4", description="CPU request of a build pod.")
    build_memory: str = Field("16Gi", description="Memory request and limit of a build pod.")
    serving_priority_class: str = Field(
        "", description="PriorityClass of serving pods (the chart's is above builds'); empty: the cluster default."
    )
    build_priority_class: str = Field(
        "", description="PriorityClass of build pods: below serving, so a build never keeps a replica off a GPU."
    )
    drain_seconds: int = Field(
        10, ge=0, description="preStop sleep of serving pods, so endpoints drop them before SIGTERM arrives."
    )
    termination_grace_seconds: int = Field(
        60, ge=1, description="Grace period of serving pods: drain plus finishing work."
    )
    namespaces: list[str] = Field(default_factory=list, description="Namespaces to watch; empty watches the cluster.")
    resync_seconds: float = Field(300, gt=0, description="Every InferenceModel is reconciled at least this often.")
    autoscale_interval_seconds: float = Field(15, gt=0, description="How often the autoscaler decides.")
    leader_election_lease_name: str = Field(
        "modelfleet-operator", description="The coordination.k8s.io/v1 Lease the replicas elect a leader on."
    )
    leader_election_namespace: str = Field(
        "modelfleet-system",
        description="Namespace of the Lease when neither POD_NAMESPACE nor the service account's namespace says.",
    )
    leader_election_lease_duration_seconds: int = Field(
        15, ge=1, description="A standby takes over a Lease nobody renewed for this long (as it observed it)."
    )
    leader_election_renew_deadline_seconds: float = Field(
        10, gt=0, description="The leader exits when it could not renew its Lease for this long."
    )
    leader_election_retry_period_seconds: float = Field(
        2, gt=0, description="How often the leader renews and a standby tries to acquire."
    )

    @model_validator(mode="after")
    def _leader_election_timing(self) -> Self:
        # client-go's rules: the leader gives up before a standby may take over, after a few tries.
        if not self.leader_election_lease_duration_seconds > self.leader_election_renew_deadline_seconds:
            raise ValueError("leader_election_lease_duration_seconds must exceed the renew deadline")
        if not self.leader_election_renew_deadline_seconds > 1.2 * self.leader_election_retry_period_seconds:
            raise ValueError("leader_election_renew_deadline_seconds must exceed 1.2 x the retry period")
        return self

    @model_validator(mode="after")
    def _distinct_serving_ports(self) -> Self:
        if self.serving_grpc_port == self.serving_port:
            raise ValueError(f"serving_grpc_port must differ from serving_port ({self.serving_port}); 0 turns gRPC off")
        return self

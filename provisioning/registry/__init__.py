"""The fleet service's registry: schema (schema.py), engines and transactions (engine.py) and the
repository API the service calls (repository.py). Independent of MQTT."""

from agent.protocol.lifecycle import KeyState
from provisioning.db.engine import (
    RetryableConflict,
    make_engine,
    missing_tables,
    redact_url,
    run_in_transaction,
    session_factory,
)
from provisioning.db.migrations import create_schema
from provisioning.db.schema import (
    AttestationResult,
    DeviceState,
    Outcome,
    PendingChange,
    Role,
)
from provisioning.registry.repository import (
    AckStatus,
    CommitRecord,
    DeviceRecord,
    EpochConflict,
    GroupRecord,
    KeyRecord,
    KeyStateReport,
    KeyTransitionRecord,
    MemberRecord,
    OperatorRecord,
    Registry,
    StationRecord,
    cert_fingerprint,
    judge_ack,
    key_state_items,
    new_state_token,
    pem_fingerprint,
    plan_key_states,
)

__all__ = [
    "new_state_token",
    "AckStatus",
    "AttestationResult",
    "CommitRecord",
    "DeviceRecord",
    "DeviceState",
    "EpochConflict",
    "GroupRecord",
    "KeyRecord",
    "KeyState",
    "KeyStateReport",
    "KeyTransitionRecord",
    "MemberRecord",
    "OperatorRecord",
    "Outcome",
    "PendingChange",
    "Registry",
    "plan_key_states",
    "RetryableConflict",
    "Role",
    "StationRecord",
    "cert_fingerprint",
    "judge_ack",
    "key_state_items",
    "create_schema",
    "make_engine",
    "missing_tables",
    "pem_fingerprint",
    "redact_url",
    "run_in_transaction",
    "session_factory",
]

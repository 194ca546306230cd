"""The virtual fleet's SIMULATION BYPASSES of the registry, both audited: devices registered
directly (no factory enrollment, a synthetic EK fingerprint; ``device.register.simulated``) and
the rows of a group built in one step (group, members, one ack each; ``group.seed.simulated``).
A real installation never writes these rows this way; only ``firmware_sim.fleet`` does."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from sqlalchemy.orm import Session, sessionmaker

from agent.protocol.errors import ConfigError
from provisioning import audit
from provisioning.db import schema as registry_schema
from provisioning.registry import (
    Outcome,
    Registry,
    make_engine,
    run_in_transaction,
    session_factory,
)
from provisioning.service.store import admissions

log = logging.getLogger(__name__)

ACTOR: Final = "local:firmware-sim-fleet"


def open_registry(url: str) -> tuple[Any, sessionmaker[Session]]:
    """Engine and session factory for the fleet's registry (caller disposes the engine)."""
    engine = make_engine(url)
    return engine, session_factory(engine)


def synthetic_ek_fingerprint(device_id: str, devid_cert_pem: str) -> str:
    """The registry wants an EK fingerprint per device; a virtual device has no EK, so this is a
    hash that names the simulation and cannot collide with a real certificate's."""
    data = b"keyfleet virtual fleet: no EK\0" + device_id.encode() + b"\0" + devid_cert_pem.encode()
    return hashlib.sha256(data).hexdigest()


def register_devices(
    registry_url: str, id_prefix: str, certs: Mapping[str, str], *, now: int
) -> int:
    """Write a registry row for each device of ``certs`` (device id -> DevID certificate PEM)
    not registered yet, creating the tables if needed; one audit entry for the batch. A device
    id registered with another certificate is refused (``ConfigError``, nothing written).
    Returns how many were added."""
    engine = make_engine(registry_url)
    try:
        registry_schema.Base.metadata.create_all(engine)
        sessions = session_factory(engine)

        def work(session: Session) -> int:
            registry = Registry(session)
            added = 0
            for device_id, cert_pem in certs.items():
                row = session.get(registry_schema.Device, device_id)
                if row is not None:
                    if row.devid_cert_pem != cert_pem:
                        raise ConfigError(
                            f"the registry already has a device {device_id!r} with another DevID "
                            f"certificate: use another fleet.id_prefix or the original fleet.dir"
                        )
                    continue
                registry.register_device(
                    device_id,
                    ek_cert_fingerprint=synthetic_ek_fingerprint(device_id, cert_pem),
                    devid_cert_pem=cert_pem,
                    now=now,
                )
                added += 1
            if added:
                audit.append(
                    session,
                    now=now,
                    actor=ACTOR,
                    action="device.register.simulated",
                    target=id_prefix,
                    outcome=Outcome.ACCEPTED,
                    reason=(
                        "virtual fleet: registered WITHOUT factory enrollment (software keys, "
                        "simulation only)"
                    ),
                    details={"count": added},
                )
            return added

        added = run_in_transaction(sessions, work)
        if added:
            log.warning(
                "registered %d virtual devices directly in the registry (no factory enrollment: "
                "simulation only)",
                added,
            )
        return added
    finally:
        engine.dispose()


def record_seeded_group(
    sessions: sessionmaker[Session],
    group_id: str,
    *,
    epoch: int,
    public_tree: bytes,
    group_context: bytes,
    members: Sequence[str],
    epoch_authenticator: bytes,
    now: int,
    authz: bytes | None = None,
) -> None:
    """The registry rows of a group built in one step: the group (its public state), every
    member at its leaf index (``members[i]`` at leaf i, joined at ``epoch``), one ack per member
    so that each counts as holding the current epoch, the Authorization every leaf records as
    its admission (``authz``, if any: the service delivers it to joiners), and the audit
    entry."""

    def work(session: Session) -> None:
        session.add(
            registry_schema.Group(
                group_id=group_id,
                epoch=epoch,
                public_tree=public_tree,
                group_context=group_context,
                created_at=now,
                updated_at=now,
            )
        )
        for leaf_index, device_id in enumerate(members):
            session.add(
                registry_schema.GroupMember(
                    group_id=group_id,
                    device_id=device_id,
                    leaf_index=leaf_index,
                    pending=None,
                    joined_epoch=epoch,
                    requested_at=now,
                )
            )
        session.flush()
        if authz is not None:
            admissions.keep(session, group_id, [authz], epoch=epoch)
        registry = Registry(session)
        for device_id in members:
            registry.record_ack(
                group_id,
                epoch=epoch,
                device_id=device_id,
                epoch_authenticator=epoch_authenticator,
                now=now,
            )
        audit.append(
            session,
            now=now,
            actor=ACTOR,
            action="group.seed.simulated",
            target=group_id,
            outcome=Outcome.ACCEPTED,
            reason="virtual fleet: group built directly, not by adds (simulation only)",
            details={"members": len(members)},
        )

    run_in_transaction(sessions, work)

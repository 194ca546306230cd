"""One virtual device (``VirtualDevice``): its agent configuration, its simulated software keys
and the agent's protocol core (``agent.core.AgentCore``, the state machine ``keyagent run``
drives), fed with inbound messages and ticks by the MQTT multiplexer; and ``load_devices``,
which loads every device through the agent's own configuration loader and key gate, letting the
agent's INSECURE warnings through once instead of once per device."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.serialization import Encoding

from agent.config import AgentConfig, load_config
from agent.core import AgentCore, Publish
from agent.protocol.errors import KeyfleetError
from agent.protocol.lifecycle import KeyKind
from agent.protocol.wire.envelope import DEFAULT_MAX_AGE
from agent.protocol.wire.messages.ack import Ack
from firmware_sim.fleet.keys import SimulatedSoftwareKeys

log = logging.getLogger(__name__)

_INSECURE_TEXT: Final = "INSECURE: simulation.insecure_software_keys"
_DEVID_INSECURE_TEXT: Final = "INSECURE: the DevID key is a SOFTWARE key"


class VirtualDevice:
    """One virtual device: its agent configuration, simulated keys and protocol core."""

    def __init__(self, config: AgentConfig, keys: SimulatedSoftwareKeys, *, now: int) -> None:
        assert config.identity is not None and config.fleet is not None
        assert config.broker is not None
        self.config = config
        self.device_id = config.identity.device_id
        self.keys = keys
        self.credential = config.identity.devid_cert.certificates[0].public_bytes(Encoding.DER)
        self.core = AgentCore(
            self.device_id,
            config.fleet.service_key,
            keys,
            credential=self.credential,
            membership=config.fleet.membership(),
            now=now,
            policy_for=config.rotation.for_group,
            max_age=max(DEFAULT_MAX_AGE, config.broker.session_expiry),
        )
        self.core.ledger.add("devid", KeyKind.DEVID, active=True)
        self.acks: dict[tuple[str, int], float] = {}  # (group, epoch) -> monotonic time acked
        self.errors = 0

    def __repr__(self) -> str:
        return f"VirtualDevice({self.device_id!r})"

    def handle(self, topic: str, payload: bytes, now: int) -> list[Publish]:
        """One inbound message through the core; returns what to publish. The core's own
        contract (persist before publishing) holds trivially: the state is memory."""
        before = dict(self.core.last_acks)
        try:
            outcome = self.core.handle(payload, topic, now)
        except KeyfleetError as exc:
            self.errors += 1
            log.error("%s: message on %s failed: %s", self.device_id, topic, exc)
            return []
        self._note_acks(before, outcome.publishes)
        self.keys.retain(self.core.leaf_refs())
        return outcome.publishes

    def report(self, now: int) -> list[Publish]:
        return self.core.report(now).publishes

    def tick(self, now: int) -> list[Publish]:
        return self.core.tick(now).publishes

    def _note_acks(self, before: dict[str, tuple[int, int]], publishes: Sequence[Publish]) -> None:
        if not any(p.type == Ack.TYPE for p in publishes):
            return
        stamp = time.monotonic()
        for group, (epoch, _) in self.core.last_acks.items():
            if before.get(group, (None, None))[0] != epoch or (group, epoch) not in self.acks:
                self.acks.setdefault((group, epoch), stamp)


class _InsecureOnce(logging.Filter):
    """The agent logs its INSECURE warnings once per loaded configuration; a fleet loads
    thousands. The first goes through, the rest are counted (the fleet says how many)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        for marker in (_INSECURE_TEXT, _DEVID_INSECURE_TEXT):
            if text.startswith(marker):
                self.seen[marker] = self.seen.get(marker, 0) + 1
                return self.seen[marker] == 1
        return True


@contextlib.contextmanager
def _insecure_warnings_once() -> Iterator[_InsecureOnce]:
    gate = _InsecureOnce()
    loggers = [logging.getLogger("keyagent.config"), logging.getLogger("keyagent.daemon")]
    for logger in loggers:
        logger.addFilter(gate)
    try:
        yield gate
    finally:
        for logger in loggers:
            logger.removeFilter(gate)


def load_devices(
    config_paths: Sequence[Path], *, allow_insecure: bool, now: int | None = None
) -> list[VirtualDevice]:
    """Load every device's agent configuration with the agent's loader and its DevID key through
    the agent's gate. The first refusal stops everything (``ConfigError`` naming the file)."""
    stamp = int(time.time()) if now is None else now
    devices = []
    with _insecure_warnings_once() as gate:
        for path in config_paths:
            config = load_config(path, require_provisioned=True)
            keys = SimulatedSoftwareKeys.from_config(config, allow_insecure=allow_insecure)
            devices.append(VirtualDevice(config, keys, now=stamp))
    log.warning(
        "INSECURE: virtual fleet of %d devices with SOFTWARE keys (simulation only; the agent's "
        "INSECURE warnings above were repeated for each device: %s)",
        len(devices),
        ", ".join(f"{count}x {marker!r}" for marker, count in gate.seen.items()) or "none",
    )
    return devices

"""The virtual fleet: N device agents in one process, against the real broker and service.

What is real: every device runs the agent's protocol core (``agent.core.AgentCore``, the very
state machine ``keyagent run`` drives), configured by its own agent configuration file loaded by
the agent's own loader (``agent.config.load_config``); it has its own DevID certificate from the
fleet device CA, its own MQTT connection with mutual TLS (client certificate CN = device id, so
the broker's ACL confines it exactly as it confines a real device), and it speaks the real wire
protocol to the real ``keyfleet serve``.

What is simulated, and why it is INSECURE: there is no TPM. The DevID key, the leaf keys and the
group's private state are software keys in this process's memory (``SimulatedSoftwareKeys``),
and the "AK" that proves leaf keys TPM-resident is a software key too (``SimulatedAK``: its
certify is built by hand, so the proof has the real structure and proves nothing).
That is what makes a thousand devices fit on one machine (one swtpm and one keyagent per device
would not), and it is exactly what a real device must never do. So the agent's own gate decides:
each device's configuration must say ``[simulation] insecure_software_keys = true`` (otherwise
``load_config`` refuses the software DevID key) and the caller must pass the explicit flag
(``--allow-insecure-software-keys``; ``agent.daemon.load_devid`` refuses otherwise, the same
check ``keyagent run`` makes). A fleet that starts logs an ``INSECURE`` warning.

SIMULATION BYPASSES, on purpose (never in a real installation):

- **Registration without factory enrollment.** ``prepare_identities`` writes each device's
  registry row directly through ``provisioning.registry`` (with a synthetic EK fingerprint: a
  virtual device has no EK), so there is no EK chain check, no credential activation and no AK.
  One audit entry (action ``device.register.simulated``) records every such batch.
- **Groups built in one step** (``VirtualFleet.seed_group``, benchmarks only): the protocol
  core's ``Group.assemble`` builds a full group of every fleet device, each core installs its
  member state through ``AgentCore.install_group``, and the group is written to the registry
  (group row, members, one ack each), instead of N-1 sequential adds, each of which every member
  must process (O(N^2) work: hours at N = 1000). Audited as ``group.seed.simulated``. Rekeys,
  removals and adds after that go through the real service as usual.

State lives in memory only: a restarted fleet has lost its groups (the service then sees members
that never ack; re-add them, or start a fresh group).

Modules, one concern each:

- ``config``: the fleet configuration file (schema, loader, the text tests write);
- ``identities``: per-device DevID key, certificate and agent configuration on disk;
- ``registry``: the registry rows the bypasses write, and ``open_registry``;
- ``keys``: ``SimulatedSoftwareKeys``, a virtual device's key provider;
- ``credentials``: ``SimulatedAK``, a virtual device's software "AK" and the TPM-residency
  proofs it fakes for leaf keys (SIMULATED: the TPMS_ATTEST is built by hand);
- ``device``: ``VirtualDevice`` (one agent core) and ``load_devices``;
- ``groups``: the one-step group of every device;
- ``mqtt``: ``VirtualFleet``, the MQTT multiplexer driving every device from one thread.

The names below are the package's public interface: ``from firmware_sim.fleet import X``.
"""

from __future__ import annotations

from firmware_sim.fleet.config import (
    FLEET_SCHEMA,
    FleetConfig,
    fleet_config_text,
    load_fleet_config,
)
from firmware_sim.fleet.credentials import SimulatedAK
from firmware_sim.fleet.device import VirtualDevice, load_devices
from firmware_sim.fleet.groups import seed_group
from firmware_sim.fleet.identities import CERT_VALIDITY, DEVICE_ROLE, prepare_identities
from firmware_sim.fleet.keys import SimulatedSoftwareKeys
from firmware_sim.fleet.mqtt import FleetStatus, VirtualFleet
from firmware_sim.fleet.registry import (
    open_registry,
    record_seeded_group,
    register_devices,
    synthetic_ek_fingerprint,
)

__all__ = [
    "CERT_VALIDITY",
    "DEVICE_ROLE",
    "FLEET_SCHEMA",
    "FleetConfig",
    "FleetStatus",
    "SimulatedAK",
    "SimulatedSoftwareKeys",
    "VirtualDevice",
    "VirtualFleet",
    "fleet_config_text",
    "load_devices",
    "load_fleet_config",
    "open_registry",
    "prepare_identities",
    "record_seeded_group",
    "register_devices",
    "seed_group",
    "synthetic_ek_fingerprint",
]

"""``keyagent factory-reset``: destroy this device's identity and every key it holds.

What it does, in this order (each step is safe to repeat after a crash: an interrupted reset is
finished by running it again):

1. **Refuses while the agent runs** (its local API socket accepts connections, or the pid in
   its status file is a live keyagent): two processes must never own the TPM keys and the state
   file at once, and a running agent would write state back after the shredding.
2. **Tells the service** (provisioned devices): one ``device.destroyed`` envelope signed by the
   DevID key in the TPM (the last thing that key signs), published QoS 1 on the device's report
   topic with a clean MQTT session (the broker drops the queued commands of the old identity).
   Its sequence number is the clock in milliseconds: larger than any the agent used (they count
   from 1), without needing the state file. The service then marks the device and its keys
   destroyed, removes it from its groups and refuses its key afterwards.
3. **Flushes the TPM**: every transient object still loaded (a killed agent's) is flushed, and
   the agent's rotating parents (persistent handles 0x81004B40-0x81004B4F, ``agent.tpm.parents``)
   are evicted: no leaf or init key blob, nor any copy of one, loads after that. Other persistent
   handles found are listed, not touched (the EKs live there).
4. **Shreds** (overwrite, fsync, unlink: ``agent.fsio.shred``) every key blob and state file:
   the encrypted state file, the sealed state key, the status file, leaf key blobs, app secret
   blobs, state kept aside as ``*.sealed-elsewhere.*``, the factory's key blobs and identity
   files, the files ``[identity]`` names (DevID key blob and certificate, AK blob, TLS key and
   certificate), the agent configuration if factory provisioning wrote it, and the factory lock
   last, so the device is in factory mode again and can be re-provisioned.
5. With ``--clear-tpm``: TPM2_Clear (``TPMStore.clear``), see below.

Why shredding alone does not make every key blob useless: a TPM key blob is the private part
encrypted under its parent. For leaf and init keys that is a rotating parent, evicted in step 3.
For the DevID, the AK and the sealed state key it is the SRK, which the TPM re-creates from its
storage primary seed forever: a copy of such a blob taken before the reset (a backup, a disk
image) still loads on this TPM. Only a new storage seed ends that: TPM2_Clear (lockout
authorization, empty on a device nobody took ownership of). ``--clear-tpm`` does it and
re-creates the EKs, which Clear evicts, from their templates (same keys: the endorsement seed
does not change, so the EK certificates stay valid and the device can be enrolled again).
Without it, destruction of the SRK's blobs relies on no copy existing; with it, no copy of any
blob loads anywhere.

If the service cannot be told (broker unreachable, TLS files already gone): the keys are
destroyed anyway (the point of a reset is that the keys are gone), and the command exits 1
saying the service was not told, so an operator revokes the device instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import AgentConfig, load_config
from agent.config import config_path as default_config_path
from agent.daemon import (
    APP_SEAL_DIR,
    LEAF_DIR,
    STATUS_FILE,
    load_devid,
)
from agent.fsio import shred
from agent.localapi.protocol import DEFAULT_API_SOCKET
from agent.mqtt import MqttClient
from agent.protocol.errors import ConfigError, KeyfleetError, StateError, TPMError
from agent.protocol.topics import SERVICE_ID, device_report_topic
from agent.protocol.wire.envelope import encode_message
from agent.protocol.wire.messages.key_state import DESTROYED_REASON_MAX, DeviceDestroyed
from agent.staterotation import NEXT_KEY_BLOB, NEXT_STATE_FILE, STATE_FILE, STATE_KEY_BLOB
from agent.tpm.parents import ParentRing
from agent.tpm.store import TPMKey, TPMStore
from agent.treestore import TREE_DIR

log = logging.getLogger("keyagent.reset")

FACTORY_MARK: Final = "# written by keyfleet factory provisioning"
FACTORY_DIRS: Final = ("keys", "identity")
LOCK_FILE: Final = "factory.lock"
DEFAULT_TIMEOUT: Final = 10.0


class AgentRunning(StateError):
    """The agent is running: a reset would race it for the TPM keys and the state file."""


@dataclass
class ResetPlan:
    """What one reset touches, from the configuration (or, if it no longer loads because an
    earlier reset was interrupted, from its raw TOML)."""

    config_path: Path
    state_dir: Path
    tcti: str
    api_socket: Path
    identity_files: list[Path]
    config: AgentConfig | None = field(default=None, repr=False)
    factory_written: bool = False
    unloadable: str | None = None  # why the configuration no longer loads (raw TOML used)

    @property
    def device_id(self) -> str | None:
        if self.config is None or self.config.identity is None:
            return None
        return self.config.identity.device_id


@dataclass
class ResetReport:
    device_id: str | None
    destroyed: list[Path] = field(default_factory=list)
    tpm: list[str] = field(default_factory=list)
    service_told: bool = False
    service_note: str = ""
    needs_service: bool = True  # False only for a device that was never provisioned

    @property
    def exit_code(self) -> int:
        """0 destroyed and (if provisioned) the service told; 1 destroyed, service not told."""
        return 0 if self.service_told or not self.needs_service else 1


def plan_reset(config_path: str | Path | None) -> ResetPlan:
    """Read what the reset must destroy. A configuration that no longer loads (its identity
    files already shredded by an interrupted reset) is read as plain TOML: the reset can always
    be finished, only the service can then not be told."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        path = _config_path(config_path)
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError):
            raise exc from None
        log.warning("the configuration does not load (%s); resetting from its raw TOML", exc)
        plan = _plan_from_raw(path, raw)
        plan.unloadable = str(exc).splitlines()[0]
        return plan
    identity = config.identity
    files: list[Path] = []
    if identity is not None:
        files = [identity.devid_key, identity.devid_cert.path, identity.tls_cert.path]
        files.append(identity.tls_key)
        if identity.ak_key is not None:
            files.append(identity.ak_key)
    source = config.source
    return ResetPlan(
        config_path=source,
        state_dir=config.state.dir,
        tcti=config.tpm.tcti,
        api_socket=config.api.socket,
        identity_files=files,
        config=config,
        factory_written=_factory_written(source),
    )


def _config_path(config_path: str | Path | None) -> Path:
    return default_config_path(config_path)


def _factory_written(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.readline().strip() == FACTORY_MARK
    except OSError:
        return False


def _plan_from_raw(path: Path, raw: dict[str, Any]) -> ResetPlan:
    def table(name: str) -> dict[str, Any]:
        value = raw.get(name, {})
        return value if isinstance(value, dict) else {}

    state_dir = table("state").get("dir", "/var/lib/keyagent")
    tcti = table("tpm").get("tcti", "device:/dev/tpmrm0")
    api_socket = table("api").get("socket", str(DEFAULT_API_SOCKET))
    identity = table("identity")
    files = [
        Path(identity[k])
        for k in ("devid_key", "devid_cert", "tls_cert", "tls_key", "ak_key")
        if isinstance(identity.get(k), str) and Path(identity[k]).is_absolute()
    ]
    if not all(isinstance(v, str) for v in (state_dir, tcti, api_socket)):
        raise ConfigError(f"{path}: state.dir, tpm.tcti and api.socket must be strings")
    return ResetPlan(
        config_path=path,
        state_dir=Path(state_dir),
        tcti=tcti,
        api_socket=Path(api_socket),
        identity_files=files,
        factory_written=_factory_written(path),
    )


# -- step 1: is the agent running? ------------------------------------------------------------


def running_agent(plan: ResetPlan) -> str | None:
    """Why we think a keyagent is running on this state, or None."""
    if plan.api_socket.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(plan.api_socket))
            return f"its local API socket {plan.api_socket} accepts connections"
        except OSError:
            pass  # a stale socket file left by a killed agent
        finally:
            probe.close()
    try:
        status = json.loads((plan.state_dir / STATUS_FILE).read_bytes())
        pid = int(status["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None  # no such process
    if b"keyagent" in cmdline or b"agent.cli" in cmdline:
        return f"keyagent pid {pid} (from {STATUS_FILE}) is alive"
    return None


# -- step 2: tell the service -----------------------------------------------------------------


def tell_service(
    plan: ResetPlan,
    store: TPMStore,
    *,
    reason: str,
    allow_insecure: bool,
    timeout: float,
    clock: Callable[[], float],
) -> None:
    """Publish a DevID-signed ``device.destroyed``; raises on any failure (TransportError,
    TPMError, ConfigError)."""
    config = plan.config
    assert config is not None and config.identity is not None and config.broker is not None
    device_id = config.identity.device_id
    devid: ec.EllipticCurvePrivateKey = load_devid(store, config, allow_insecure)
    try:
        now = clock()
        payload = encode_message(
            DeviceDestroyed(reason=reason[:DESTROYED_REASON_MAX] or "factory reset"),
            key=devid,
            sender=device_id,
            to=SERVICE_ID,
            seq=int(now * 1000),
            time=int(now),
        )
    finally:
        if isinstance(devid, TPMKey):
            devid.close()
    client = MqttClient(
        host=config.broker.host,
        port=config.broker.port,
        ca_file=config.broker.ca.path,
        cert_file=config.identity.tls_cert.path,
        key_file=config.identity.tls_key,
        client_id=device_id,
        clean_start=True,  # the old identity's queued commands are garbage now
        session_expiry=0,
        keepalive=max(5, int(timeout)),
        timeout=timeout,
    )
    try:
        client.connect(timeout)
        client.publish(device_report_topic(device_id), payload, timeout=timeout)
    finally:
        client.close()


# -- step 4: what to shred --------------------------------------------------------------------


def files_to_destroy(plan: ResetPlan) -> list[Path]:
    """Every file the reset destroys, in order; the factory lock comes last."""
    state = plan.state_dir
    found: list[Path] = []

    def add(path: Path) -> None:
        if path not in found and (path.is_file() or path.is_symlink()):
            found.append(path)

    for name in (STATE_FILE, STATE_KEY_BLOB, NEXT_STATE_FILE, NEXT_KEY_BLOB):
        add(state / name)
        for aside in sorted(state.glob(f"{name}.sealed-elsewhere.*")):
            add(aside)
        for aside in sorted(state.glob(f"{name}.rollback.*")):
            add(aside)
    for directory in (LEAF_DIR, APP_SEAL_DIR, TREE_DIR, *FACTORY_DIRS):
        for path in sorted((state / directory).rglob("*")):
            add(path)
    for aside in sorted(state.glob(f"{TREE_DIR}.rollback.*")):
        for path in sorted(aside.rglob("*")):
            add(path)
    for path in plan.identity_files:
        add(path)
    add(state / STATUS_FILE)
    if plan.factory_written:
        add(plan.config_path)
    lock = state / LOCK_FILE
    if lock in found:
        found.remove(lock)
    add(lock)
    return found


def _remove_empty_dirs(state: Path) -> None:
    for directory in (LEAF_DIR, APP_SEAL_DIR, TREE_DIR, *FACTORY_DIRS):
        root = state / directory
        if not root.is_dir():
            continue
        for sub in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if sub.is_dir():
                with contextlib.suppress(OSError):
                    sub.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


@contextlib.contextmanager
def _tpm(tcti: str, notes: list[str]) -> Iterator[TPMStore | None]:
    try:
        store = TPMStore(tcti)
    except TPMError as exc:
        notes.append(f"TPM not usable ({exc}): nothing flushed")
        yield None
        return
    try:
        yield store
    finally:
        store.close()


def factory_reset(
    config_path: str | Path | None,
    *,
    reason: str = "factory reset",
    clear_tpm: bool = False,
    allow_insecure: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    clock: Callable[[], float] = time.time,
    on_destroyed: Callable[[Path], None] = lambda path: None,
) -> ResetReport:
    """Run the whole reset (module docstring). Raises ``AgentRunning`` before touching anything
    if the agent runs, ``ConfigError`` if there is no configuration to reset."""
    plan = plan_reset(config_path)
    busy = running_agent(plan)
    if busy is not None:
        raise AgentRunning(f"keyagent is running ({busy}): stop it first (systemctl stop keyagent)")
    report = ResetReport(device_id=plan.device_id)
    with _tpm(plan.tcti, report.tpm) as store:
        if plan.unloadable is not None:
            # an interrupted reset (identity files gone) or a broken file: we cannot sign
            report.service_note = (
                f"the service was NOT told: the configuration no longer loads ({plan.unloadable})"
            )
        elif plan.device_id is None:
            report.needs_service = False
            report.service_note = "not provisioned: no service to tell"
        elif store is None:
            report.service_note = "the service was NOT told: the TPM (DevID key) is unusable"
        else:
            try:
                tell_service(
                    plan,
                    store,
                    reason=reason,
                    allow_insecure=allow_insecure,
                    timeout=timeout,
                    clock=clock,
                )
                report.service_told = True
                report.service_note = (
                    f"the service was told: {DeviceDestroyed.TYPE} for {plan.device_id} "
                    "accepted by the broker"
                )
            except KeyfleetError as exc:
                report.service_note = f"the service was NOT told: {exc}"
        if store is not None:
            flushed = store.flush_transients()
            report.tpm.append(f"flushed {flushed} transient TPM object(s)")
            try:
                evicted = ParentRing(store).evict_all()
                report.tpm.append(
                    "evicted the rotating parents of leaf and init keys: "
                    + (", ".join(f"0x{h:08x}" for h in evicted) or "none there")
                )
            except TPMError as exc:
                report.tpm.append(f"could NOT evict the rotating parents: {exc}")
            persistent = store.persistent_handles()
            report.tpm.append(
                "persistent handles left, not keyfleet's: "
                + (", ".join(f"0x{h:08x}" for h in persistent) or "none")
            )
        for path in files_to_destroy(plan):
            shred(path)
            report.destroyed.append(path)
            on_destroyed(path)
        _remove_empty_dirs(plan.state_dir)
        if clear_tpm:
            if store is None:
                raise StateError("--clear-tpm: the TPM is not usable; nothing was cleared")
            report.tpm.append("TPM2_Clear done: a new storage seed; no old key blob loads")
            report.tpm.extend(store.clear())
    return report

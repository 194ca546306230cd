"""The device's factory mode: what a fresh device answers on its factory serial port.

``FactoryDevice.handle(op, args)`` is the request handler (no serial I/O: the link is
``agent.serial_link.DeviceLink``); ``run_factory_console`` serves it on a serial port and
``serve_factory_on_pty`` on a new pseudo-terminal in a thread (firmware-sim, tests).

Requests, in the order the station (``keyprovision``) sends them:

- ``identity`` (alias ``hello``): serial, locked, device id once locked, EK certificates and
  public areas (RSA, and ECC if present), PCR values, firmware versions and event log if known.
- ``create-keys``: AK, DevID and leaf keys created in the TPM (blobs saved in the state dir) and a
  software TLS key; returns their public areas and the TLS key's SubjectPublicKeyInfo.
- ``certify`` {qualifying_data}: TPM2_Certify of the DevID by the AK (attest, DER signature).
- ``activate-credential`` {credential_blob, encrypted_secret, ek}: the secret, which goes back
  only as the proof the service asked for.
- ``install`` {device_id, devid_cert, tls_cert, trust_anchors (device CA), operator_anchors
  (operator CA: membership changes need approvals chained to it), min_approvals, broker,
  service_cert, groups}: files written, then the agent config, validated with the agent's own
  loader.
- ``lock``: the factory port is locked (only after a valid install).

Once locked (``factory.lock`` in the state dir), every request but ``identity`` is refused with
``factory.locked``: a provisioned device cannot be provisioned again. A factory reset (later work)
destroys the keys and identity files and removes the lock file last.

Every request is safe to run again after a device reset (the station retries): ``create-keys``
makes new keys and forgets any identity installed for the old ones; ``certify`` and
``activate-credential`` use the saved blobs; ``install`` overwrites the same files and writes the
agent config last (its appearance is the commit point); ``lock`` is checked by ``identity``.

State directory layout::

    keys/ak.tss keys/devid.tss keys/leaf.tss   TPM-wrapped key blobs (TSS2 PRIVATE KEY, 0600)
    identity/tls.key                           software TLS client key (PKCS#8 PEM, 0600)
    identity/devid.pem identity/tls.pem        certificates issued by the fleet device CA
    identity/trust-anchors.pem                 fleet trust anchors (device CA, operator CA)
    identity/broker-ca.pem identity/service.pem
    identity/groups.json                       group assignments from the station
    agent.toml (default; see ``config_path``)  the agent configuration in provisioned mode
    factory.lock                               present = locked

Check ids: ``factory.op`` (unknown request), ``factory.args`` (missing or malformed argument),
``factory.locked``, ``factory.keys.missing``, ``factory.install.*`` (the installed material does
not fit the device's keys or does not make a valid agent config), ``factory.lock.not-installed``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import threading
import time
import tty
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import serial
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import load_config
from agent.configschema import https_url
from agent.fsio import atomic_write, shred
from agent.protocol.attest import public_key_from_area
from agent.protocol.errors import ProtocolError, StateError, TPMError
from agent.serial_link import INSTALL_ARGS, OPTIONAL_INSTALL_ARGS, Args, DeviceLink, Handler
from agent.tpm.blob import KeyBlob
from agent.tpm.store import EKKind, TPMStore
from agent.tpm.templates import KeyKind

log = logging.getLogger("keyagent.factory")

FACTORY_PROTOCOL = 1
DEFAULT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7)
LOCK_FILE = "factory.lock"
MAX_QUALIFYING_DATA = 64
MAX_CERT = 16 * 1024
MAX_TRUST_ANCHORS = 8
MAX_GROUPS = 64
MAX_URL = 256
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9.:\[\]-]{1,253}")

_KEY_FILES = {KeyKind.AK: "ak.tss", KeyKind.DEVID: "devid.tss", KeyKind.LEAF: "leaf.tss"}
_IDENTITY_FILES = (
    "devid.pem",
    "tls.pem",
    "trust-anchors.pem",
    "broker-ca.pem",
    "service.pem",
    "groups.json",
)


@dataclass(frozen=True)
class FactoryPaths:
    """Where factory mode keeps things, under one state directory."""

    state_dir: Path
    config: Path

    @property
    def keys(self) -> Path:
        return self.state_dir / "keys"

    @property
    def identity(self) -> Path:
        return self.state_dir / "identity"

    @property
    def lock(self) -> Path:
        return self.state_dir / LOCK_FILE

    @property
    def tls_key(self) -> Path:
        return self.identity / "tls.key"

    def key_blob(self, kind: KeyKind) -> Path:
        return self.keys / _KEY_FILES[kind]


# ---- argument checks ------------------------------------------------------------------------


def _bytes_arg(args: Args, name: str, *, max_len: int, min_len: int = 1) -> bytes:
    value = args.get(name)
    if not isinstance(value, bytes) or not min_len <= len(value) <= max_len:
        raise ProtocolError("factory.args", f"{name} must be {min_len}..{max_len} bytes")
    return value


def _text_arg(args: Args, name: str, pattern: re.Pattern[str]) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ProtocolError("factory.args", f"{name} is missing or malformed")
    return value


def _only(args: Args, allowed: Sequence[str]) -> None:
    extra = sorted(set(args) - set(allowed))
    if extra:
        raise ProtocolError("factory.args", f"unexpected arguments {extra}")


def _renewal_url(data: object) -> str | None:
    """The service's HTTPS renewal listener from the install request (the agent's
    ``[renewal] url``), or None if the fleet gives none."""
    if data is None:
        return None
    if not isinstance(data, str) or not 0 < len(data) <= MAX_URL:
        raise ProtocolError("factory.args", "renewal_url must be an https URL")
    try:
        return https_url(data)
    except ValueError as exc:
        raise ProtocolError("factory.args", f"renewal_url: {exc}") from None


def _release_key(data: object) -> ec.EllipticCurvePublicKey | None:
    """The fleet's release-signing key from the install request (SubjectPublicKeyInfo DER of a
    P-256 key), or None if the fleet gives none."""
    if data is None:
        return None
    if not isinstance(data, bytes) or not 0 < len(data) <= MAX_CERT:
        raise ProtocolError("factory.args", "release_key must be a DER public key")
    try:
        key = serialization.load_der_public_key(data)
    except ValueError:
        raise ProtocolError("factory.args", "release_key does not parse") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ProtocolError("factory.args", "release_key must be an EC P-256 key")
    return key


def _certificate(data: object, name: str) -> x509.Certificate:
    if not isinstance(data, bytes) or not 0 < len(data) <= MAX_CERT:
        raise ProtocolError("factory.args", f"{name} must be a DER certificate")
    try:
        return x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion):  # a version field outside 1..3 raises the latter
        raise ProtocolError("factory.args", f"{name} is not a DER X.509 certificate") from None


def _certificates(data: object, name: str) -> list[x509.Certificate]:
    if not isinstance(data, list) or not 0 < len(data) <= MAX_TRUST_ANCHORS:
        raise ProtocolError("factory.args", f"{name} must be 1..{MAX_TRUST_ANCHORS} certificates")
    return [_certificate(item, name) for item in data]


def _same_key(a: object, b: ec.EllipticCurvePublicKey) -> bool:
    if not isinstance(a, ec.EllipticCurvePublicKey):
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes for everything json.dumps emits
    return json.dumps(value, ensure_ascii=True)


# ---- the handler ----------------------------------------------------------------------------


class FactoryDevice:
    """A device in factory mode. ``handle`` is the ``DeviceLink`` handler."""

    def __init__(
        self,
        store: TPMStore,
        state_dir: str | os.PathLike[str],
        *,
        serial: str | None = None,
        config_path: str | os.PathLike[str] | None = None,
        pcrs: Sequence[int] = DEFAULT_PCRS,
        firmware_versions: Mapping[str, str] | None = None,
        event_log: bytes | None = None,
        seal_pcrs: Sequence[int] | None = None,
        api_socket: str | os.PathLike[str] | None = None,
        event_log_path: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        state = Path(state_dir).resolve()
        self.paths = FactoryPaths(
            state_dir=state,
            config=Path(config_path).resolve() if config_path else state / "agent.toml",
        )
        self._store = store
        self._serial = serial
        self._pcrs = tuple(pcrs)
        self._firmware = dict(firmware_versions or {})
        self._event_log = event_log
        # what the device image knows about itself: the PCRs its boot chain measures (the agent
        # seals its state key to them) and where its local API lives; None = the agent's default
        self._seal_pcrs = tuple(seal_pcrs) if seal_pcrs is not None else None
        self._api_socket = Path(api_socket).resolve() if api_socket is not None else None
        # where the firmware writes its measured-boot event log at each boot: the agent sends it
        # with every attestation quote
        self._event_log_path = Path(event_log_path).resolve() if event_log_path else None
        self._clock = clock
        self._ops: dict[str, Callable[[Args], Args]] = {
            "identity": self._identity,
            "hello": self._identity,
            "create-keys": self._create_keys,
            "certify": self._certify,
            "activate-credential": self._activate_credential,
            "install": self._install,
            "lock": self._lock,
        }

    @property
    def serial(self) -> str:
        """The hardware serial the station records; without one configured, the EK
        certificate's serial number (stable for the TPM, printable)."""
        if self._serial is None:
            self._serial = f"ek-{self._store.ek_certificate('rsa').serial_number:x}"
        return self._serial

    @property
    def locked(self) -> bool:
        return self.paths.lock.exists()

    def locked_device_id(self) -> str | None:
        try:
            record = json.loads(self.paths.lock.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return "unknown"  # a damaged lock file still locks
        device_id = record.get("device_id") if isinstance(record, dict) else None
        return device_id if isinstance(device_id, str) else "unknown"

    def handle(self, op: str, args: Args) -> Args:
        action = self._ops.get(op)
        if action is None:
            raise ProtocolError("factory.op", f"unknown request {op!r}")
        if op not in ("identity", "hello") and self.locked:
            raise ProtocolError(
                "factory.locked",
                f"locked: this device is provisioned (as {self.locked_device_id()}); "
                "a factory reset is needed before it can be provisioned again",
            )
        log.info("factory: %s", op)
        return action(args)

    # -- identity --

    def _identity(self, args: Args) -> Args:
        _only(args, ())
        ek: dict[str, Any] = {}
        kinds: tuple[EKKind, ...] = ("rsa", "ecc")
        for kind in kinds:
            try:
                cert = self._store.ek_certificate(kind)
                public = self._store.ek_public_area(kind)
            except TPMError as exc:
                if kind == "rsa":
                    raise
                log.info("factory: no ECC EK (%s)", exc.detail)
                continue
            ek[kind] = {"cert": cert.public_bytes(serialization.Encoding.DER), "public": public}
        result: Args = {
            "protocol": FACTORY_PROTOCOL,
            "serial": self.serial,
            "locked": self.locked,
            "ek": ek,
            "pcrs": dict(self._store.pcr_read(self._pcrs)),
            "firmware": dict(self._firmware),
            "keys": self.paths.key_blob(KeyKind.DEVID).exists(),
        }
        device_id = self.locked_device_id()
        if device_id is not None:
            result["device_id"] = device_id
        if self._event_log is not None:
            result["event_log"] = self._event_log
        return result

    # -- keys --

    def _forget_identity(self) -> None:
        """New keys make any installed identity meaningless: remove it (config first, so a
        half-removed identity never looks provisioned)."""
        shred(self.paths.config)
        for name in _IDENTITY_FILES:
            shred(self.paths.identity / name)

    def _create_keys(self, args: Args) -> Args:
        _only(args, ())
        self._forget_identity()
        self.paths.keys.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.paths.identity.mkdir(parents=True, exist_ok=True, mode=0o700)
        publics: Args = {}
        for kind, field_name in (
            (KeyKind.AK, "ak_public"),
            (KeyKind.DEVID, "devid_public"),
            (KeyKind.LEAF, "leaf_public"),
        ):
            blob = self._store.create_key(kind)
            blob.save(self.paths.key_blob(kind))
            publics[field_name] = blob.public
        # Python's ssl cannot use a TPM-held key in-process (STACK.md), so the MQTT transport key
        # is a software key; the DevID in the TPM signs every message the device sends.
        tls_key = ec.generate_private_key(ec.SECP256R1())
        atomic_write(
            self.paths.tls_key,
            tls_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            mode=0o600,
        )
        publics["tls_public"] = tls_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return publics

    def _blob(self, kind: KeyKind) -> KeyBlob:
        path = self.paths.key_blob(kind)
        if not path.exists():
            raise ProtocolError("factory.keys.missing", "no keys yet: send create-keys first")
        return KeyBlob.load(path)

    def _tls_public(self) -> ec.EllipticCurvePublicKey:
        try:
            data = self.paths.tls_key.read_bytes()
        except FileNotFoundError:
            raise ProtocolError(
                "factory.keys.missing", "no TLS key yet: send create-keys first"
            ) from None
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise StateError(f"{self.paths.tls_key} does not hold an EC key")
        return key.public_key()

    def _certify(self, args: Args) -> Args:
        _only(args, ("qualifying_data",))
        qualifying = _bytes_arg(args, "qualifying_data", max_len=MAX_QUALIFYING_DATA)
        with (
            self._store.load_key(self._blob(KeyKind.AK)) as ak,
            self._store.load_key(self._blob(KeyKind.DEVID)) as devid,
        ):
            attestation = self._store.certify(ak, devid, qualifying)
        return {"attest": attestation.attest, "signature": attestation.signature}

    def _activate_credential(self, args: Args) -> Args:
        _only(args, ("credential_blob", "encrypted_secret", "ek"))
        blob = _bytes_arg(args, "credential_blob", max_len=4096)
        secret = _bytes_arg(args, "encrypted_secret", max_len=4096)
        ek = args.get("ek", "rsa")
        if ek not in ("rsa", "ecc"):
            raise ProtocolError("factory.args", "ek must be 'rsa' or 'ecc'")
        with self._store.load_key(self._blob(KeyKind.AK)) as ak:
            recovered = self._store.activate_credential(ak, blob, secret, ek)
        try:
            # The secret goes back only as the proof the service asked for; it protects nothing
            # on the device and is not kept.
            return {"secret": recovered.reveal()}
        finally:
            recovered.wipe()

    # -- install and lock --

    def _install(self, args: Args) -> Args:
        _only(args, (*INSTALL_ARGS, *OPTIONAL_INSTALL_ARGS))
        device_id = _text_arg(args, "device_id", _DEVICE_ID)
        devid_cert = _certificate(args.get("devid_cert"), "devid_cert")
        tls_cert = _certificate(args.get("tls_cert"), "tls_cert")
        anchors = _certificates(args.get("trust_anchors"), "trust_anchors")
        operator_anchors = _certificates(args.get("operator_anchors"), "operator_anchors")
        min_approvals = args.get("min_approvals")
        if type(min_approvals) is not int or not 1 <= min_approvals <= 16:
            raise ProtocolError("factory.args", "min_approvals must be 1..16")
        service_cert = _certificate(args.get("service_cert"), "service_cert")
        broker = args.get("broker")
        if not isinstance(broker, dict) or set(broker) != {"host", "port", "ca"}:
            raise ProtocolError("factory.args", "broker must be a map of host, port, ca")
        host = _text_arg(broker, "host", _HOST)
        port = broker["port"]
        if type(port) is not int or not 1 <= port <= 65535:
            raise ProtocolError("factory.args", "broker port must be 1..65535")
        broker_ca = _certificates(broker["ca"], "broker ca")
        groups = args.get("groups", [])
        if (
            not isinstance(groups, list)
            or len(groups) > MAX_GROUPS
            or not all(isinstance(g, str) and _GROUP.fullmatch(g) for g in groups)
        ):
            raise ProtocolError("factory.args", "groups must be a list of group names")

        release_key = _release_key(args.get("release_key"))
        renewal_url = _renewal_url(args.get("renewal_url"))

        devid_blob = self._blob(KeyKind.DEVID)
        if not _same_key(devid_cert.public_key(), public_key_from_area(devid_blob.public)):
            raise ProtocolError(
                "factory.install.devid", "the DevID certificate is not for this device's DevID key"
            )
        if not _same_key(tls_cert.public_key(), self._tls_public()):
            raise ProtocolError(
                "factory.install.tls", "the TLS certificate is not for this device's TLS key"
            )
        names = devid_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if [n.value for n in names] != [device_id]:
            raise ProtocolError(
                "factory.install.devid", "the DevID certificate's CN is not the device id"
            )
        issuer = next((a for a in anchors if a.subject == devid_cert.issuer), None)
        try:
            if issuer is None:
                raise InvalidSignature
            devid_cert.verify_directly_issued_by(issuer)
            tls_cert.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError):
            raise ProtocolError(
                "factory.install.chain",
                "the DevID/TLS certificates are not issued by one of the trust anchors",
            ) from None

        ident = self.paths.identity
        files = {
            "devid.pem": _pem(devid_cert),
            "tls.pem": _pem(tls_cert),
            "trust-anchors.pem": _pem(*anchors),
            "operator-anchors.pem": _pem(*operator_anchors),
            "broker-ca.pem": _pem(*broker_ca),
            "service.pem": _pem(service_cert),
            "groups.json": json.dumps({"groups": groups}).encode(),
        }
        if release_key is not None:
            files["release-key.pem"] = release_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        for name, data in files.items():
            atomic_write(ident / name, data, mode=0o644)
        self._write_config(
            device_id,
            host,
            port,
            min_approvals,
            releases=release_key is not None,
            renewal_url=renewal_url,
        )
        return {"config": str(self.paths.config), "device_id": device_id}

    def _write_config(
        self,
        device_id: str,
        host: str,
        port: int,
        min_approvals: int,
        *,
        releases: bool,
        renewal_url: str | None = None,
    ) -> None:
        ident = self.paths.identity
        lines = [
            "# written by keyfleet factory provisioning",
            "[tpm]",
            f"tcti = {_toml_string(self._store.tcti)}",
            *([f"pcrs = {list(self._seal_pcrs)}"] if self._seal_pcrs is not None else []),
            "",
            *(
                ["[api]", f"socket = {_toml_string(str(self._api_socket))}", ""]
                if self._api_socket is not None
                else []
            ),
            "[state]",
            f"dir = {_toml_string(str(self.paths.state_dir))}",
            "",
            "[identity]",
            f"device_id = {_toml_string(device_id)}",
            f"devid_cert = {_toml_string(str(ident / 'devid.pem'))}",
            f"devid_key = {_toml_string(str(self.paths.key_blob(KeyKind.DEVID)))}",
            f"ak_key = {_toml_string(str(self.paths.key_blob(KeyKind.AK)))}",
            f"tls_cert = {_toml_string(str(ident / 'tls.pem'))}",
            f"tls_key = {_toml_string(str(self.paths.tls_key))}",
            "",
            "[fleet]",
            f"service_cert = {_toml_string(str(ident / 'service.pem'))}",
            f"trust_anchors = [{_toml_string(str(ident / 'trust-anchors.pem'))}]",
            f"operator_anchors = [{_toml_string(str(ident / 'operator-anchors.pem'))}]",
            f"min_approvals = {min_approvals}",
            "",
            "[broker]",
            f"host = {_toml_string(host)}",
            f"port = {port}",
            f"ca = {_toml_string(str(ident / 'broker-ca.pem'))}",
            "",
            *(
                ["[releases]", f"key = {_toml_string(str(ident / 'release-key.pem'))}", ""]
                if releases
                else []
            ),
            *(
                ["[attestation]", f"event_log = {_toml_string(str(self._event_log_path))}", ""]
                if self._event_log_path is not None
                else []
            ),
            *(
                ["[renewal]", f"url = {_toml_string(renewal_url)}", ""]
                if renewal_url is not None
                else []
            ),
        ]
        self.paths.config.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.paths.config, "\n".join(lines).encode(), mode=0o644)
        # The agent must be able to start from what we wrote: check with its own loader.
        try:
            load_config(self.paths.config, require_provisioned=True)
        except Exception as exc:
            shred(self.paths.config)
            raise ProtocolError(
                "factory.install.config", f"the written agent config does not load: {exc}"
            ) from None

    def _lock(self, args: Args) -> Args:
        _only(args, ())
        try:
            config = load_config(self.paths.config, require_provisioned=True)
        except Exception:
            raise ProtocolError(
                "factory.lock.not-installed", "nothing installed yet: send install first"
            ) from None
        if config.identity is None:  # pragma: no cover - require_provisioned guarantees it
            raise ProtocolError("factory.lock.not-installed", "no identity installed")
        device_id = config.identity.device_id
        record = {"device_id": device_id, "locked_at": int(self._clock())}
        atomic_write(self.paths.lock, json.dumps(record).encode(), mode=0o644)
        log.info("factory: locked as %s", device_id)
        return {"device_id": device_id}


# ---- serving it -----------------------------------------------------------------------------


def run_factory_console(
    port_path: str,
    store: TPMStore,
    state_dir: str | os.PathLike[str],
    *,
    serial_number: str | None = None,
    stop: threading.Event | None = None,
    baudrate: int = 115200,
    **device_options: Any,
) -> None:
    """Serve factory mode on the serial port ``port_path`` until ``stop`` is set (forever if
    None). The port is opened with pyserial, so a pty path or a real UART both work."""
    device = FactoryDevice(store, state_dir, serial=serial_number, **device_options)
    link = DeviceLink(device.handle)
    stop = stop or threading.Event()
    try:
        port = serial.serial_for_url(port_path, baudrate=baudrate, timeout=0.05)
    except (serial.SerialException, OSError, ValueError) as exc:
        raise StateError(f"cannot open factory port {port_path}: {exc}") from None
    try:
        while not stop.is_set():
            data = port.read(4096)
            if data:
                out = link.receive(data)
                if out:
                    port.write(out)
                    port.flush()
    finally:
        port.close()


Intercept = Callable[[str, Args, Handler], Mapping[str, Any]]


class FactoryConsole:
    """A factory console served on a pty by a thread: the stop handle of
    ``serve_factory_on_pty``. ``restart`` simulates a device reset: the in-memory link state
    (partial frame, reply cache) is lost, a reply being computed is never sent, and the device
    starts again from its state directory, optionally on a new TPM connection (after the TPM
    itself restarted)."""

    def __init__(
        self,
        store: TPMStore,
        state_dir: str | os.PathLike[str],
        *,
        serial_number: str | None = None,
        **device_options: Any,
    ) -> None:
        self._state_dir = state_dir
        self._serial = serial_number
        self._options = device_options
        self._lock = threading.RLock()
        self._generation = 0
        self._store = store
        self.intercept: Intercept | None = None
        self._device, self._link = self._make()
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="factory-console", daemon=True)
        self._thread.start()

    def _make(self) -> tuple[FactoryDevice, DeviceLink]:
        device = FactoryDevice(self._store, self._state_dir, serial=self._serial, **self._options)

        def handler(op: str, args: Args) -> Mapping[str, Any]:
            if self.intercept is not None:
                return self.intercept(op, args, device.handle)
            return device.handle(op, args)

        return device, DeviceLink(handler)

    @property
    def device(self) -> FactoryDevice:
        return self._device

    @property
    def link(self) -> DeviceLink:
        return self._link

    def restart(self, store: TPMStore | None = None) -> None:
        with self._lock:
            self._generation += 1
            if store is not None:
                self._store = store
            self._device, self._link = self._make()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._master], [], [], 0.05)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                data = os.read(self._master, 4096)
            except OSError:
                return
            with self._lock:
                link, generation = self._link, self._generation
            out = link.receive(data)
            with self._lock:
                if generation != self._generation:
                    continue  # the device "lost power" while answering: the reply is gone
            view = memoryview(out)
            try:
                while view:
                    view = view[os.write(self._master, view) :]
            except OSError:
                return

    def stop(self) -> None:
        """Stop serving and close the pty (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._master = self._slave = -1

    def __enter__(self) -> FactoryConsole:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_factory_on_pty(
    store: TPMStore,
    state_dir: str | os.PathLike[str],
    *,
    serial_number: str | None = None,
    **device_options: Any,
) -> tuple[str, FactoryConsole]:
    """Serve factory mode on a new pseudo-terminal in a background thread; returns the pty's
    path (open it as the station's serial port) and the console (``stop()``, ``restart()``).
    ``device_options`` go to ``FactoryDevice`` (config_path, pcrs, firmware_versions,
    event_log)."""
    console = FactoryConsole(store, state_dir, serial_number=serial_number, **device_options)
    return console.path, console

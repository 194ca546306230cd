"""``keyprovision``: the factory station. Provisions one device over its serial port:

    identity -> create-keys -> certify -> enroll/start -> activate-credential -> enroll/finish
             -> install -> lock

The device side is ``agent.factory``; the service side is ``provisioning.enroll`` behind
``provisioning.http`` (HTTPS with the station's client certificate). The station relays and
checks; it holds no key of the device and no CA key.

No half-registered device: the service registers the device only in enroll/finish. If install or
lock fails after that, the station asks the service to undo the registration
(DELETE /v1/enroll/{device}) and says whether that worked; before finish, nothing was registered
and the pending session simply expires.

Before the station says a word to the device it checks its own side (``check_tls_files``: each
of ``--cert``, ``--key`` and ``--ca`` exists, is readable and parses, the key belongs to the
certificate, the certificate is within its validity) and makes one request to the service
(``FleetClient.probe``), so a wrong file is named at once instead of after the device has created
its keys. Connection errors say which side failed: the service unreachable, reached but its
certificate does not verify against ``--ca``, or reached but it refused the station certificate.

Exit status: 0 provisioned; 1 provisioning failed (the device or the service refused, or a link
failed); 2 the station could not start (usage, a TLS file missing or wrong, the service
unreachable or not trusted, no serial port).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from agent.protocol.errors import ConfigError, KeyfleetError, ProtocolError, TransportError
from agent.protocol.secret import Secret
from agent.protocol.wire import cbor
from agent.protocol.wire.messages.operator import check_tag
from agent.serial_link import INSTALL_ARGS, OPTIONAL_INSTALL_ARGS, SerialClient
from agent.version import add_version_option
from provisioning.enroll import (
    DeviceIdentity,
    FinishRequest,
    StartRequest,
    StartResult,
    certify_qualifying_data,
)
from provisioning.http import CBOR_TYPE, MAX_BODY

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2

# Seconds per attempt for each device request; key creation is the slow one on a real TPM chip
# (three ECC keys at 30-300 ms per operation, plus swap-outs on a TPM without resource manager).
DEVICE_TIMEOUTS: Mapping[str, float] = {
    "identity": 5.0,
    "create-keys": 60.0,
    "certify": 15.0,
    "activate-credential": 30.0,
    "install": 30.0,
    "lock": 10.0,
}
STEPS = (
    "identity",
    "create-keys",
    "certify",
    "enroll-start",
    "activate-credential",
    "enroll-finish",
    "install",
    "lock",
)


# ---- the station's own files ----------------------------------------------------------------


def _read_file(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{flag} {path}: is a directory, not a file") from None
    except PermissionError:
        raise ConfigError(f"{flag} {path}: not readable by this user (permission denied)") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot be read: {exc.strerror}") from None


def _certificates(flag: str, path: Path, data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(
            f"{flag} {path}: not a PEM certificate (no valid '-----BEGIN CERTIFICATE-----' block)"
        ) from None


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_tls_files(cert: Path, key: Path, ca: Path, *, now: datetime | None = None) -> None:
    """The station's TLS files, each checked on its own so that the error names the file and
    what is wrong with it: exists and readable, ``--cert`` a PEM certificate (chain) within its
    validity, ``--key`` an unencrypted PEM private key whose public key is the certificate's,
    ``--ca`` PEM certificates. Raises ``ConfigError``; reads nothing but these three files."""
    cert_data = _read_file("--cert", cert)
    key_data = _read_file("--key", key)
    ca_data = _read_file("--ca", ca)
    leaf = _certificates("--cert", cert, cert_data)[0]
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise ConfigError(
            f"--key {key}: the private key is encrypted; the station needs it unencrypted "
            "(protect it with file permissions, mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"--key {key}: not a PEM private key (no valid '-----BEGIN ... PRIVATE KEY-----' block)"
        ) from None
    if _public_der(private.public_key()) != _public_der(leaf.public_key()):
        raise ConfigError(
            f"--key {key} is not the key of --cert {cert} ({leaf.subject.rfc4514_string()}): "
            "their public keys differ"
        )
    when = now or datetime.now(UTC)
    if when < leaf.not_valid_before_utc:
        raise ConfigError(
            f"--cert {cert}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    if when > leaf.not_valid_after_utc:
        raise ConfigError(
            f"--cert {cert}: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
        )
    _certificates("--ca", ca, ca_data)


# ---- the fleet service client ---------------------------------------------------------------


class FleetClient:
    """HTTPS client of the enrollment API with the station's certificate (mutual TLS).

    The constructor checks the three TLS files (``check_tls_files``); ``probe()`` makes one
    request that proves the service is reachable, trusted by ``ca`` and accepts ``cert``."""

    def __init__(
        self,
        url: str,
        *,
        cert: Path,
        key: Path,
        ca: Path,
        timeout: float = 30.0,
        retries: int = 2,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise ConfigError(f"--fleet {url!r}: expected https://HOST:PORT")
        self.host = parsed.hostname
        self.port = parsed.port or 443
        self.timeout = timeout
        self.retries = retries
        self.cert = cert
        self.ca = ca
        check_tls_files(cert, key, ca)
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"station TLS files unusable (cert {cert}, key {key}, ca {ca}): {exc}"
            ) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context = context

    @property
    def _where(self) -> str:
        return f"fleet service {self.host}:{self.port}"

    def _exchange(self, method: str, path: str, body: object | None) -> tuple[int, bytes]:
        """One HTTP exchange, retried while the service cannot be reached or drops the link;
        a certificate that does not verify against ``ca`` or a TLS alert is final."""
        payload = None if body is None else cbor.encode(body)
        last = ""
        for attempt in range(1 + self.retries):
            if attempt:
                time.sleep(0.2 * 2**attempt)
            conn = http.client.HTTPSConnection(
                self.host, self.port, context=self._context, timeout=self.timeout
            )
            try:
                try:
                    conn.connect()  # TCP, then the TLS handshake: the service's certificate
                except ssl.SSLCertVerificationError as exc:
                    raise TransportError(
                        f"{self._where} reached, but its certificate does not verify against "
                        f"--ca {self.ca}: {exc.verify_message}"
                    ) from None
                except (ssl.SSLEOFError, ConnectionResetError):
                    last = self._dropped("during the TLS handshake")
                    continue
                except ssl.SSLError as exc:
                    raise self._tls_failed(exc) from None
                except OSError as exc:
                    last = f"{self._where} unreachable: {exc.strerror or exc}"
                    continue
                try:
                    headers = {"Content-Type": CBOR_TYPE, "Accept": CBOR_TYPE}
                    conn.request(method, path, body=payload, headers=headers)
                    response = conn.getresponse()
                    return response.status, response.read(MAX_BODY + 1)
                except (
                    http.client.RemoteDisconnected,
                    ssl.SSLEOFError,
                    ConnectionResetError,
                    BrokenPipeError,
                ):
                    # TLS 1.3: the service checks the station certificate after the station
                    # has finished its handshake; a refusal is a closed connection (or an alert).
                    last = self._dropped("without an answer")
                    continue
                except ssl.SSLError as exc:
                    raise self._tls_failed(exc) from None
                except (OSError, http.client.HTTPException) as exc:
                    last = f"{self._where} reached, but the connection failed: {exc}"
                    continue
            finally:
                conn.close()
        raise TransportError(last)

    def _dropped(self, when: str) -> str:
        return (
            f"{self._where} reached, but it closed the connection {when}: most likely it "
            f"refused the station certificate --cert {self.cert} (is it issued by the "
            "service's station CA?)"
        )

    def _tls_failed(self, exc: ssl.SSLError) -> TransportError:
        reason = str(exc.reason or exc)
        if "ALERT" in reason.upper():
            return TransportError(
                f"{self._where} reached, but it refused the station certificate --cert "
                f"{self.cert} (TLS alert {reason.lower()}): is it issued by the service's "
                "station CA?"
            )
        return TransportError(f"{self._where} reached, but the TLS handshake failed: {exc}")

    def _request(self, method: str, path: str, body: object | None) -> Any:
        status, data = self._exchange(method, path, body)
        return self._decode(status, data)

    def probe(self) -> None:
        """One request that changes nothing (the API index, answered 404 ``http.route``):
        the service is reachable, its certificate verifies against ``ca`` and it accepts the
        station certificate. Raises ``TransportError`` naming which of these failed."""
        self._exchange("GET", "/v1/enroll", None)

    @staticmethod
    def _decode(status: int, data: bytes) -> Any:
        try:
            value = cbor.decode(data, max_size=MAX_BODY)
        except ProtocolError:
            raise ProtocolError(
                "station.fleet.response", f"HTTP {status} with a body that is not CBOR"
            ) from None
        if status == 200:
            return value
        if isinstance(value, dict) and isinstance(value.get("check"), str):
            raise ProtocolError(value["check"], f"{value.get('reason', '')} (HTTP {status})")
        raise ProtocolError("station.fleet.response", f"HTTP {status}")

    def start(self, request: StartRequest) -> StartResult:
        return StartResult.from_map(self._request("POST", "/v1/enroll/start", request.to_map()))

    def finish(self, session: str, secret: bytes) -> DeviceIdentity:
        request = FinishRequest(session=session, secret=Secret(secret))
        try:
            value = self._request("POST", "/v1/enroll/finish", request.to_map())
        finally:
            request.secret.wipe()
        return DeviceIdentity.from_map(value)

    def revoke(self, device_id: str, reason: str) -> None:
        query = urllib.parse.urlencode({"reason": reason[:200]})
        path = f"/v1/enroll/{urllib.parse.quote(device_id, safe='')}?{query}"
        self._request("DELETE", path, None)


# ---- the provisioning run -------------------------------------------------------------------


@dataclass
class StepResult:
    name: str
    ok: bool
    seconds: float
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.name,
            "ok": self.ok,
            "ms": round(self.seconds * 1000, 1),
            "detail": self.detail,
        }


@dataclass
class ProvisionReport:
    """The outcome of one run. ``revoked`` is None when nothing had been registered, True when
    a registration was undone after a failed install, False when undoing it failed too (then
    ``error`` says so and an operator must revoke the device)."""

    ok: bool = False
    device_id: str | None = None
    serial: str | None = None
    steps: list[StepResult] = field(default_factory=list)
    error: dict[str, str] | None = None
    revoked: bool | None = None
    seconds: float = 0.0

    @property
    def enrollment_seconds(self) -> float:
        """Time from enroll/start to enroll/finish (both included)."""
        names = ("enroll-start", "activate-credential", "enroll-finish")
        return sum(s.seconds for s in self.steps if s.name in names)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "device_id": self.device_id,
            "serial": self.serial,
            "steps": [s.to_json() for s in self.steps],
            "error": self.error,
            "revoked": self.revoked,
            "seconds": round(self.seconds, 3),
            "enrollment_seconds": round(self.enrollment_seconds, 3),
        }


class _StepFailed(Exception):
    def __init__(self, step: str, error: KeyfleetError) -> None:
        super().__init__(step)
        self.step = step
        self.error = error


class Station:
    """One provisioning run per ``provision()`` call, over ``device`` (the serial link) and
    ``fleet`` (the enrollment API)."""

    def __init__(
        self,
        device: SerialClient,
        fleet: FleetClient,
        *,
        groups: Sequence[str] = (),
        tags: Sequence[str] = (),
        rng: Callable[[int], bytes] = os.urandom,
        on_step: Callable[[StepResult], None] | None = None,
        device_timeouts: Mapping[str, float] = DEVICE_TIMEOUTS,
    ) -> None:
        self.device = device
        self.fleet = fleet
        self.groups = tuple(groups)
        self.tags = tuple(tags)
        self._rng = rng
        self._on_step = on_step
        self._timeouts = device_timeouts

    def _step(
        self,
        report: ProvisionReport,
        name: str,
        action: Callable[[], Any],
        detail: Callable[[Any], str] = lambda _: "",
    ) -> Any:
        began = time.perf_counter()
        try:
            result = action()
        except KeyfleetError as exc:
            step = StepResult(name, False, time.perf_counter() - began, str(exc))
            report.steps.append(step)
            if self._on_step:
                self._on_step(step)
            raise _StepFailed(name, exc) from None
        step = StepResult(name, True, time.perf_counter() - began, detail(result))
        report.steps.append(step)
        if self._on_step:
            self._on_step(step)
        return result

    def _call(self, op: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.device.call(op, args, timeout=self._timeouts.get(op))

    def provision(self) -> ProvisionReport:
        report = ProvisionReport()
        began = time.perf_counter()
        try:
            self._run(report)
            report.ok = True
        except _StepFailed as failed:
            error = failed.error
            check = error.check if isinstance(error, ProtocolError) else type(error).__name__
            reason = error.reason if isinstance(error, ProtocolError) else str(error)
            report.error = {"step": failed.step, "check": check, "reason": reason}
        finally:
            report.seconds = time.perf_counter() - began
        return report

    def _run(self, report: ProvisionReport) -> None:
        ident = self._step(
            report,
            "identity",
            lambda: self._call("identity"),
            lambda r: f"serial {r.get('serial')}",
        )
        report.serial = ident.get("serial") if isinstance(ident.get("serial"), str) else None
        if ident.get("locked"):
            raise _StepFailed(
                "identity",
                ProtocolError(
                    "factory.locked",
                    f"device is locked: already provisioned as {ident.get('device_id')}",
                ),
            )
        ek = ident.get("ek")
        if not isinstance(ek, dict) or not isinstance(ek.get("rsa"), dict):
            raise _StepFailed(
                "identity", ProtocolError("station.device.ek", "device reported no RSA EK")
            )
        keys = self._step(report, "create-keys", lambda: self._call("create-keys"))
        nonce = self._rng(32)
        tls_public = keys["tls_public"]
        certify = self._step(
            report,
            "certify",
            lambda: self._call(
                "certify", {"qualifying_data": certify_qualifying_data(nonce, tls_public)}
            ),
        )
        request = StartRequest(
            serial=str(report.serial or ident.get("serial")),
            ek_kind="rsa",
            ek_cert=ek["rsa"]["cert"],
            ek_public=ek["rsa"]["public"],
            ak_public=keys["ak_public"],
            devid_public=keys["devid_public"],
            tls_public=tls_public,
            certify_attest=certify["attest"],
            certify_signature=certify["signature"],
            certify_nonce=nonce,
            groups=self.groups,
            tags=self.tags,
        )
        started: StartResult = self._step(
            report,
            "enroll-start",
            lambda: self.fleet.start(request),
            lambda r: f"device id {r.device_id}",
        )
        activated = self._step(
            report,
            "activate-credential",
            lambda: self._call(
                "activate-credential",
                {
                    "credential_blob": started.credential_blob,
                    "encrypted_secret": started.encrypted_secret,
                    "ek": "rsa",
                },
            ),
        )
        identity: DeviceIdentity = self._step(
            report,
            "enroll-finish",
            lambda: self.fleet.finish(started.session, activated["secret"]),
            lambda r: f"registered as {r.device_id}",
        )
        report.device_id = identity.device_id
        try:
            self._step(
                report,
                "install",
                lambda: self._call("install", _install_args(identity)),
                lambda r: f"config {r.get('config')}",
            )
            self._step(report, "lock", lambda: self._lock(identity.device_id))
        except _StepFailed as failed:
            report.revoked = self._undo(identity.device_id, failed)
            if not report.revoked:
                raise _StepFailed(
                    failed.step,
                    ProtocolError(
                        "station.half-registered",
                        f"{failed.error}; AND undoing the registration of "
                        f"{identity.device_id} failed: an operator must revoke it",
                    ),
                ) from None
            raise

    def _lock(self, device_id: str) -> dict[str, Any]:
        try:
            return self._call("lock")
        except ProtocolError as exc:
            # A lock whose answer was lost (device reset after locking): identity tells.
            if exc.check != "factory.locked":
                raise
            ident = self._call("identity")
            if ident.get("locked") and ident.get("device_id") == device_id:
                return {"device_id": device_id}
            raise

    def _undo(self, device_id: str, failed: _StepFailed) -> bool:
        began = time.perf_counter()
        try:
            self.fleet.revoke(device_id, f"{failed.step} failed at the station: {failed.error}")
        except KeyfleetError as exc:
            step = StepResult("revoke", False, time.perf_counter() - began, str(exc))
            ok = False
        else:
            step = StepResult("revoke", True, time.perf_counter() - began, f"undid {device_id}")
            ok = True
        if self._on_step:
            self._on_step(step)
        return ok


def _install_args(identity: DeviceIdentity) -> dict[str, Any]:
    values = identity.to_map()
    return {
        name: values[name] for name in (*INSTALL_ARGS, *OPTIONAL_INSTALL_ARGS) if name in values
    }


# ---- command line ---------------------------------------------------------------------------


def _tag(value: str) -> str:
    try:
        check_tag(value)
    except ProtocolError as err:
        raise argparse.ArgumentTypeError(f"[{err.check}] {err.reason}") from None
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keyprovision",
        description="Provision a device in factory mode over its serial port.",
    )
    add_version_option(parser)
    parser.add_argument("--port", required=True, help="serial port of the device (/dev/ttyUSB0)")
    parser.add_argument("--fleet", required=True, help="enrollment API, https://HOST:PORT")
    parser.add_argument("--cert", required=True, type=Path, help="station certificate (PEM)")
    parser.add_argument("--key", required=True, type=Path, help="station private key (PEM)")
    parser.add_argument("--ca", required=True, type=Path, help="CA of the service's TLS cert")
    parser.add_argument("--group", action="append", default=[], help="assign a group (repeat)")
    parser.add_argument(
        "--tag",
        action="append",
        default=[],
        type=_tag,
        help="give the device a tag (repeat): selects it for keyfleet group create --all-in TAG",
    )
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--retries", type=int, default=3, help="serial retries per request")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    args = _parser().parse_args(argv)
    stream = out or sys.stdout

    def show(step: StepResult) -> None:
        if not args.json:
            mark = "ok" if step.ok else "FAILED"
            print(
                f"[{mark:>6}] {step.name:<20} {step.seconds * 1000:7.1f} ms  {step.detail}",
                file=stream,
                flush=True,
            )

    try:
        # The station's own side first: nothing reaches the device while a file is wrong.
        fleet = FleetClient(args.fleet, cert=args.cert, key=args.key, ca=args.ca)
        fleet.probe()
        device = SerialClient.open(args.port, baudrate=args.baud, retries=args.retries)
    except (ConfigError, TransportError) as exc:
        if args.json:
            print(
                json.dumps({"ok": False, "error": {"check": "station.setup", "reason": str(exc)}}),
                file=stream,
            )
        else:
            print(f"keyprovision: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        report = Station(device, fleet, groups=args.group, tags=args.tag, on_step=show).provision()
    finally:
        device.close()
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True), file=stream)
    elif report.ok:
        print(
            f"provisioned {report.device_id} (serial {report.serial}) in "
            f"{report.seconds:.2f} s; enrollment {report.enrollment_seconds:.2f} s",
            file=stream,
        )
    else:
        assert report.error is not None
        print(
            f"provisioning FAILED at {report.error['step']}: [{report.error['check']}] "
            f"{report.error['reason']}",
            file=stream,
        )
        if report.revoked:
            print(
                f"the registration of {report.device_id} was undone at the service; "
                "the device can be provisioned again",
                file=stream,
            )
        elif report.device_id is None:
            print("nothing was registered at the service", file=stream)
    return EXIT_OK if report.ok else EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

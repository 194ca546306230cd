"""The operator side of ``keyfleet``: signed commands over MQTT, results as they arrive.

An operator holds a certificate from the operator CA (CN ``op-<name>``, OU = role) and its key.
The same key does two jobs: the TLS client key for the broker (whose ACL lets ``op-alice`` write
only ``kf/v1/ops/op-alice/cmd`` and read only ``kf/v1/ops/op-alice/result``) and the COSE signing
key of the commands (the service checks the signature, not the broker). One file is enough
because both uses are the operator proving the same identity; keep it mode 0600.

A command goes out as one signed envelope; the service answers on the result topic with
``op.result`` messages (``accepted``, ``in-progress`` as acks arrive, then ``done``, ``failed``,
``rejected`` or ``timeout``), each checked against the service certificate before it is shown.

Exit codes (``EXIT_*``): 0 every member agrees (``propose``/``approve``: the approval was
recorded); 1 the service refused or the change failed; 2 the command could not run (usage,
files, broker); 3 timeout (the stragglers are named); 4 a direct command is waiting for other
operators' approvals (dual control, ``provisioning.requests_cli``).

The listings (``keyfleet devices``, ``groups``, ``operator list``, ``audit show``...) read the
database directly and live in ``provisioning.listings``.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from agent.mqtt import MqttClient
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.topics import SERVICE_ID, operator_cmd_topic, operator_result_topic
from agent.protocol.wire.cose import key_id
from agent.protocol.wire.envelope import Signer, encode_message, open_message
from agent.protocol.wire.messages.operator import (
    Approve,
    AttestDevice,
    AuditSync,
    GroupAdd,
    GroupCreate,
    GroupPolicy,
    ListRequests,
    Propose,
    Rekey,
    ReleaseAdd,
    Revoke,
    TagDevice,
)
from agent.protocol.wire.messages.release import RolloutAbort, RolloutStart
from agent.protocol.wire.messages.result import (
    AuditCheckpointResult,
    OperatorResult,
    RequestsResult,
    ResultStatus,
)
from provisioning import custody, pki

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_TIMEOUT = 3
EXIT_PENDING = 4

FINAL = frozenset(
    {ResultStatus.DONE, ResultStatus.FAILED, ResultStatus.REJECTED, ResultStatus.TIMEOUT}
)
Command = (
    Rekey
    | GroupPolicy
    | ReleaseAdd
    | Revoke
    | GroupCreate
    | GroupAdd
    | AttestDevice
    | Propose
    | Approve
    | ListRequests
    | AuditSync
    | RolloutStart
    | RolloutAbort
    | TagDevice
)
Reply = OperatorResult | RequestsResult | AuditCheckpointResult
# Answers that are one message, not a stream of results ending in a final one.
ANSWERS = (RequestsResult, AuditCheckpointResult)


@dataclass(frozen=True)
class OperatorSettings:
    """Where the broker is and which files identify the operator and the service. ``key`` is a
    key reference (``provisioning.custody``): a PEM file, passphrase-encrypted or (warned about)
    plain, or a ``pkcs11:`` URI of a key in a token. A token key cannot serve TLS: then
    ``tls_cert``/``tls_key`` are the operator's TLS identity (same name, from the operator CA),
    while ``cert`` certifies the token key that signs commands and approvals.
    ``passphrase_file``: where an encrypted key's passphrase is (else
    ``$KEYFLEET_KEY_PASSPHRASE``, else a prompt on a terminal)."""

    host: str
    port: int
    ca: Path
    cert: Path
    key: Path | str
    service_cert: Path
    tls_cert: Path | None = None
    tls_key: Path | None = None
    passphrase_file: Path | None = None


PASSPHRASE_ENV = "KEYFLEET_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
_ENCRYPTED_PEM = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"


def key_passphrase(settings: OperatorSettings, key_path: Path) -> bytes:
    """The passphrase of an encrypted operator key: from ``passphrase_file``, the environment,
    or a prompt (never echoed, never logged)."""
    if settings.passphrase_file is not None:
        try:
            lines = settings.passphrase_file.read_bytes().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
        if not lines or not lines[0]:
            raise ConfigError(f"the passphrase file {settings.passphrase_file} is empty")
        return lines[0]
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value.encode()
    if sys.stdin.isatty():
        return getpass.getpass(f"passphrase of {key_path}: ").encode()
    raise ConfigError(
        f"{key_path} is encrypted: give --passphrase-file, ${PASSPHRASE_ENV}, or run on a terminal"
    )


@dataclass(frozen=True)
class LoadedKey:
    """An operator's signing key, how it is held (one line for stderr), and what TLS uses."""

    key: ec.EllipticCurvePrivateKey
    held: str
    tls_cert: Path
    tls_key: Path
    tls_password: str | None = field(default=None, repr=False)


def load_operator_key(settings: OperatorSettings) -> LoadedKey:
    """The operator's key as ``settings.key`` names it; says how it is held (``held``)."""
    ref = custody.parse_key_ref(os.fspath(settings.key))
    if isinstance(ref, custody.TokenKeyRef):
        if settings.tls_cert is None or settings.tls_key is None:
            raise ConfigError(
                "a token operator key signs commands but cannot serve TLS: give --tls-cert and "
                "--tls-key (a TLS certificate of the same operator name from the operator CA)"
            )
        key = custody.load_private_key(ref)
        return LoadedKey(
            key, f"operator key in a PKCS#11 token ({custody.describe(ref)})",
            settings.tls_cert, settings.tls_key,
        )  # fmt: skip
    path = ref.path
    data = path.read_bytes()
    tls_cert = settings.tls_cert or settings.cert
    tls_key = settings.tls_key or path
    if _ENCRYPTED_PEM in data:
        passphrase = key_passphrase(settings, path)
        key = pki.key_from_pem(data, passphrase)
        try:
            password = passphrase.decode() if tls_key == path else None
        except UnicodeDecodeError:
            raise ConfigError("the key's passphrase is not UTF-8 text") from None
        held = f"operator key in a passphrase-encrypted file ({path})"
        return LoadedKey(key, held, tls_cert, tls_key, password)
    key = pki.key_from_pem(data)
    held = (
        f"WARNING: operator key in an unencrypted file ({path}): whoever copies it acts as you; "
        "encrypt it (keyfleet pki encrypt-key) or keep it in a token"
    )
    return LoadedKey(key, held, tls_cert, tls_key)


@dataclass
class OperatorIdentity:
    name: str
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    service_key: ec.EllipticCurvePublicKey = field(repr=False)
    cert: x509.Certificate | None = None  # signs approvals (dual control)

    loaded: LoadedKey | None = field(default=None, repr=False)

    @classmethod
    def load(cls, settings: OperatorSettings) -> OperatorIdentity:
        """The operator's identity; prints on stderr, in one line, how its key is held."""
        try:
            cert = pki.cert_from_pem(settings.cert.read_bytes())
            loaded = load_operator_key(settings)
            service = load_public_key(settings.service_cert.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
        except ProtocolError as err:
            raise ConfigError(f"operator files unusable: {err}") from None
        if cert.public_key() != loaded.key.public_key():
            raise ConfigError(f"{settings.key} is not the key of {settings.cert}")
        print(f"keyfleet: {loaded.held}", file=sys.stderr)
        return cls(pki.common_name(cert), loaded.key, service, cert, loaded)


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from a PEM certificate or PEM public key (the service's, the audit
    checkpoint key)."""
    public: object
    if b"CERTIFICATE" in data:
        public = pki.cert_from_pem(data).public_key()
    else:
        public = load_pem_public_key(data)
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise ProtocolError("pki.key_type", "the key must be ECC P-256")
    return public


class OperatorClient:
    """One CLI run: connect, subscribe to results, send signed commands, read results."""

    def __init__(
        self,
        settings: OperatorSettings,
        *,
        clock: Callable[[], float] = time.time,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.identity = OperatorIdentity.load(settings)
        loaded = self.identity.loaded
        assert loaded is not None
        self._clock = clock
        self._rng = rng
        self._seq = 0
        self._backlog: list[Reply] = []  # replies read while waiting for another one
        self._client = MqttClient(
            host=settings.host,
            port=settings.port,
            ca_file=settings.ca,
            cert_file=loaded.tls_cert,
            key_file=loaded.tls_key,
            key_password=loaded.tls_password,
            client_id=f"{self.identity.name}-cli-{rng(4).hex()}",
            clean_start=True,
            session_expiry=60,
        )
        self._client.connect()
        self._client.subscribe(operator_result_topic(self.identity.name))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OperatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_command_id(self) -> bytes:
        return self._rng(16)

    def now(self) -> int:
        """The operator's clock, unix seconds."""
        return int(self._clock())

    def send(self, body: Command) -> None:
        now = int(self._clock())
        # Microseconds keep seqs increasing across CLI runs without local state, and two CLI
        # processes of one operator started together practically never draw the same one (the
        # service would refuse the second as replay.seq-reused; milliseconds collided).
        self._seq = max(self._seq + 1, int(self._clock() * 1_000_000))
        payload = encode_message(
            body,
            key=self.identity.key,
            sender=self.identity.name,
            to=SERVICE_ID,
            seq=self._seq,
            time=now,
        )
        self._client.publish(operator_cmd_topic(self.identity.name), payload)

    def _resolve(self, kid: bytes) -> Signer:
        if kid != key_id(self.identity.service_key):
            raise LookupError("not the service key")
        return Signer(SERVICE_ID, self.identity.service_key)

    def next_result(self, timeout: float) -> Reply | None:
        """The next result that verifies as the service's, or None after ``timeout``."""
        if self._backlog:
            return self._backlog.pop(0)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            message = self._client.get(timeout=left)
            if message is None:
                return None
            try:
                verified = open_message(
                    message.payload,
                    self._resolve,
                    now=int(self._clock()),
                    recipients=(self.identity.name,),
                )
            except ProtocolError as err:
                print(f"keyfleet: ignored a result that did not verify: {err}", file=sys.stderr)
                continue
            if isinstance(verified.body, OperatorResult | RequestsResult | AuditCheckpointResult):
                return verified.body

    def exchange(self, body: Command, timeout: float) -> Reply | None:
        """Send ``body`` and wait for its answer: its ``op.requests`` or ``op.audit_checkpoint``
        reply or a final ``op.result`` (a refusal). Other results read meanwhile are kept for
        later reads."""
        self.send(body)
        deadline = time.monotonic() + timeout
        kept: list[Reply] = []
        try:
            while True:
                reply = self.next_result(max(0.0, deadline - time.monotonic()))
                if reply is None:
                    return None
                if reply.command_id == body.command_id and (
                    isinstance(reply, ANSWERS) or reply.status in FINAL
                ):
                    return reply
                kept.append(reply)
        finally:
            self._backlog[:0] = kept


# -- showing progress ---------------------------------------------------------------------------


class Progress:
    """Renders results: a bar redrawn in place on a terminal, one line per change otherwise,
    JSON lines with ``--json``."""

    def __init__(self, out: TextIO, *, json_lines: bool, tty: bool | None = None) -> None:
        self.out = out
        self.json = json_lines
        self.tty = out.isatty() if tty is None else tty
        self._drawn = False
        self._last_line = ""

    def show(self, label: str, result: OperatorResult) -> None:
        if self.json:
            print(json.dumps(result_json(label, result), sort_keys=True), file=self.out)
            self.out.flush()
            return
        total = result.acked + result.pending + result.failed
        epoch = "" if result.epoch is None else f" epoch {result.epoch}"
        if self.tty and result.status is ResultStatus.IN_PROGRESS and total:
            width = 24
            filled = width * result.acked // total
            bar = "#" * filled + "." * (width - filled)
            line = f"\r{label} [{bar}] {result.acked}/{total} acked{epoch}"
            print(line.ljust(len(self._last_line)), end="", file=self.out)
            self._last_line = line
            self._drawn = True
            self.out.flush()
            return
        if self._drawn:
            print(file=self.out)
            self._drawn = False
        text = f"{label}: {result.status.value}{epoch}: {result.detail}"
        if total:
            text += f" | {result.acked} acked, {result.pending} pending"
            if result.failed:
                text += f", {result.failed} failed"
        if result.stragglers:
            text += f" | stragglers: {named_stragglers(result)}"
        if text != self._last_line:
            print(text, file=self.out)
            self._last_line = text
        self.out.flush()


def result_json(label: str, result: OperatorResult) -> dict[str, object]:
    return {
        "command": label,
        "command_id": result.command_id.hex(),
        "status": result.status.value,
        "detail": result.detail,
        "acked": result.acked,
        "pending": result.pending,
        "failed": result.failed,
        "stragglers": list(result.stragglers),
        "epoch": result.epoch,
    }


def named_stragglers(result: OperatorResult) -> str:
    """The stragglers a result names, and how many more it only counts."""
    more = result.pending + result.failed - len(result.stragglers)
    names = " ".join(result.stragglers)
    return f"{names} (+{more} more)" if more > 0 else names


def exit_code(status: ResultStatus) -> int:
    if status is ResultStatus.DONE:
        return EXIT_OK
    if status is ResultStatus.TIMEOUT:
        return EXIT_TIMEOUT
    return EXIT_FAILED


def run_commands(
    client: OperatorClient,
    commands: Sequence[tuple[str, Command]],
    *,
    timeout: float,
    progress: Progress,
    err: TextIO = sys.stderr,
) -> int:
    """Send every command, follow their results until each is final or ``timeout`` passes.
    Returns the worst exit code; on timeout names the stragglers on ``err``."""
    for _, body in commands:
        client.send(body)
    labels = {body.command_id: label for label, body in commands}
    return follow(client, labels, timeout=timeout, progress=progress, err=err)


def follow(
    client: OperatorClient,
    labels: dict[bytes, str],
    *,
    timeout: float,
    progress: Progress,
    err: TextIO = sys.stderr,
) -> int:
    """Follow the results of the commands ``labels`` names (sent already) until each is final
    or ``timeout`` passes; the worst exit code, the stragglers named on ``err``."""
    last: dict[bytes, OperatorResult] = {}
    deadline = time.monotonic() + timeout
    open_ids = set(labels)
    while open_ids:
        result = client.next_result(max(0.0, deadline - time.monotonic()))
        if result is None:
            break
        if not isinstance(result, OperatorResult) or result.command_id not in labels:
            continue
        last[result.command_id] = result
        progress.show(labels[result.command_id], result)
        if result.status in FINAL:
            open_ids.discard(result.command_id)
    codes = []
    for command_id, label in labels.items():
        result = last.get(command_id)
        if command_id in open_ids:
            pending = result.stragglers if result is not None else ()
            named = ", ".join(pending) or "the service (no final answer)"
            print(f"keyfleet: {label}: timed out after {timeout:g}s waiting for {named}", file=err)
            codes.append(EXIT_TIMEOUT)
            continue
        assert result is not None
        if result.status is ResultStatus.TIMEOUT:
            print(
                f"keyfleet: {label}: timed out; stragglers: {named_stragglers(result) or '-'}",
                file=err,
            )
        elif result.status is not ResultStatus.DONE:
            print(f"keyfleet: {label}: {result.status.value}: {result.detail}", file=err)
        codes.append(exit_code(result.status))
    return max(codes, default=EXIT_OK)

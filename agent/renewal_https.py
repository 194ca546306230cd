"""The agent's HTTPS client for certificate renewal after expiry (docs/attestation.md,
"Certificate renewal"): the broker refuses an expired client certificate, so a device whose
certificates expired posts the same signed envelopes as over MQTT to the fleet service's renewal
listener (``[renewal] url``), over server TLS (``[renewal] ca``, else ``[broker] ca``), and
presents no client certificate.

    POST {url}/v1/renew/start   {"device": id, "envelope": renew.request} -> {"envelope": ...}
    POST {url}/v1/renew/finish  {"device": id, "envelope": renew.answer}  -> {"envelope": ...}

Bodies are deterministic CBOR (``agent.protocol.wire.cbor``). A refusal by the service is a
``ProtocolError`` with the service's check id; a service that cannot be reached, or whose
certificate does not verify, is a ``TransportError``. The agent core builds and judges every
envelope (``AgentCore.expired_renewal``, ``handle``); this module only moves bytes
(``exchange``: the two steps, between the core's outcomes).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from agent.core import Outcome
from agent.protocol.errors import ConfigError, ProtocolError, TransportError
from agent.protocol.wire import cbor
from agent.protocol.wire.messages.renewal import RenewAnswer

CBOR_TYPE: Final = "application/cbor"
START_PATH: Final = "/v1/renew/start"
FINISH_PATH: Final = "/v1/renew/finish"
MAX_RESPONSE: Final = RenewAnswer.MAX_MESSAGE_SIZE + 256
TIMEOUT: Final = 15.0


class RenewalClient:
    """Posts renewal envelopes to ``url`` (``https://host[:port][/prefix]``), verifying the
    server's certificate against ``ca`` (a PEM file of CA certificates)."""

    def __init__(self, url: str, *, ca: Path, timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"[renewal] url {url!r}: expected https://HOST:PORT")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[renewal] ca {ca}: {exc}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context = context

    def __repr__(self) -> str:
        return f"RenewalClient(https://{self.host}:{self.port}{self.prefix})"

    def start(self, device_id: str, envelope: bytes) -> bytes:
        """Post a ``renew.request`` envelope; the service's ``renew.challenge`` envelope."""
        return self._post(START_PATH, device_id, envelope)

    def finish(self, device_id: str, envelope: bytes) -> bytes:
        """Post a ``renew.answer`` envelope; the service's ``renew.issued`` envelope."""
        return self._post(FINISH_PATH, device_id, envelope)

    def _post(self, path: str, device_id: str, envelope: bytes) -> bytes:
        body = cbor.encode({"device": device_id, "envelope": envelope})
        where = f"renewal listener {self.host}:{self.port}"
        import http.client  # noqa: PLC0415 - only a renewal after expiry needs it (and email)

        conn = http.client.HTTPSConnection(
            self.host, self.port, context=self._context, timeout=self.timeout
        )
        try:
            try:
                conn.request(
                    "POST",
                    self.prefix + path,
                    body=body,
                    headers={"Content-Type": CBOR_TYPE, "Accept": CBOR_TYPE},
                )
                response = conn.getresponse()
                status, data = response.status, response.read(MAX_RESPONSE + 1)
            except ssl.SSLCertVerificationError as exc:
                raise TransportError(
                    f"{where}: its certificate does not verify: {exc.verify_message}"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise TransportError(f"{where}: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        if len(data) > MAX_RESPONSE:
            raise ProtocolError("renew.https.response", f"{where}: the answer is too large")
        try:
            value = cbor.decode(data, max_size=MAX_RESPONSE)
        except ProtocolError:
            raise ProtocolError(
                "renew.https.response", f"{where}: HTTP {status} with a body that is not CBOR"
            ) from None
        if status == 200 and isinstance(value, dict) and isinstance(value.get("envelope"), bytes):
            answer: bytes = value["envelope"]
            return answer
        if isinstance(value, dict) and isinstance(value.get("check"), str):
            reason = value.get("reason")
            raise ProtocolError(
                value["check"], f"{where}: {reason if isinstance(reason, str) else ''} ({status})"
            )
        raise ProtocolError("renew.https.response", f"{where}: HTTP {status}")


def exchange(
    client: RenewalClient,
    device_id: str,
    request: Outcome,
    handle: Callable[[bytes], Outcome],
    persist: Callable[[], None],
) -> Outcome:
    """The two steps of a renewal over HTTPS. ``request``: the core's ``expired_renewal``
    outcome (its ``renew.request``); ``handle(envelope)``: the core takes a service envelope
    (``AgentCore.handle`` on its command topic); ``persist``: save the core's state (each step
    took a sequence number). Returns the outcome of ``renew.issued`` (``renewed``: the
    certificates the core checked and took). Raises ``ProtocolError`` (the service's or the
    core's refusal), ``TransportError`` (the listener unreachable), ``StateError``."""
    persist()
    answered = handle(client.start(device_id, request.publishes[0].payload))
    if answered.refused is not None:
        raise answered.refused
    persist()
    answers = [p for p in answered.publishes if p.type == RenewAnswer.TYPE]
    if len(answers) != 1:
        raise ProtocolError("renew.https.response", "the start step gave no renew.challenge")
    taken = handle(client.finish(device_id, answers[0].payload))
    if taken.refused is not None:
        raise taken.refused
    persist()
    return taken

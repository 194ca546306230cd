"""A small client for the local key API, for applications on the device (and ``keyagent api``).

One connection, opened on first use and reused; a call either returns its result or raises:
``AccessDenied`` (``api.denied``) when the agent's rules refuse the caller, ``ProtocolError``
with the agent's check id for any other refusal, ``TransportError`` when the agent cannot be
reached or the connection breaks (the next call reconnects).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from agent.localapi.protocol import (
    LENGTH,
    MAX_MESSAGE,
    Request,
    decode_response,
    default_socket_path,
    encode_request,
)
from agent.protocol.errors import ProtocolError, TransportError


class LocalApiClient:
    def __init__(
        self, socket_path: str | os.PathLike[str] | None = None, timeout: float = 10.0
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path is not None else default_socket_path()
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def __repr__(self) -> str:
        return f"LocalApiClient({str(self.socket_path)!r})"

    def __enter__(self) -> LocalApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- operations -----------------------------------------------------------------------------

    def encrypt(self, group: str, plaintext: bytes) -> bytes:
        return _bytes(self.call(Request("encrypt", group=group, data=plaintext)))

    def decrypt(self, group: str, sealed: bytes) -> bytes:
        return _bytes(self.call(Request("decrypt", group=group, data=sealed)))

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA signature by the device's DevID key over
        ``protocol.app_signing_input(data)`` (the data behind a fixed context prefix)."""
        return _bytes(self.call(Request("sign", data=data)))

    def seal(self, name: str, secret: bytes) -> None:
        self.call(Request("seal", name=name, secret=secret))

    def unseal(self, name: str) -> bytes:
        return _bytes(self.call(Request("unseal", name=name)))

    def list_keys(self) -> list[dict[str, Any]]:
        result = self.call(Request("list-keys"))
        if not isinstance(result, list) or not all(isinstance(r, dict) for r in result):
            raise ProtocolError("api.response", "list-keys result is not a list of maps")
        return result

    # -- transport ------------------------------------------------------------------------------

    def call(self, request: Request) -> object:
        """Send one request and return its result (raising the error it carried)."""
        message = encode_request(request)
        sock = self._connect()
        try:
            sock.sendall(message)
            payload = self._read_frame(sock)
        except (OSError, TransportError) as exc:
            self.close()
            if isinstance(exc, TransportError):
                raise
            raise TransportError(
                f"local API {self.socket_path}: {exc.strerror or type(exc).__name__}"
            ) from None
        return decode_response(payload)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.socket_path))
            except OSError as exc:
                sock.close()
                raise TransportError(
                    f"cannot reach keyagent at {self.socket_path}: {exc.strerror or exc}"
                ) from None
            self._sock = sock
        return self._sock

    def _read_frame(self, sock: socket.socket) -> bytes:
        (length,) = LENGTH.unpack(_read_exact(sock, LENGTH.size))
        if not 0 < length <= MAX_MESSAGE:
            raise TransportError(f"local API response length {length} is out of range")
        return _read_exact(sock, length)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(min(n - len(chunks), 65536))
        if not chunk:
            raise TransportError("keyagent closed the local API connection")
        chunks += chunk
    return bytes(chunks)


def _bytes(result: object) -> bytes:
    if not isinstance(result, bytes):
        raise ProtocolError("api.response", "result is not a byte string")
    return result

"""The local API server: one thread, one selector, non-blocking Unix stream sockets.

Why a selector thread: the daemon already runs paho's network loop in a thread and owns the TPM
through one connection; a second plain thread that multiplexes all app connections keeps backend
calls serialized (one TPM command at a time, no locking inside the backend for API calls) while a
slow or stalled client only ever holds its own buffer, never the thread.

Every connection is checked by peer credentials (SO_PEERCRED: the kernel's record of the
connecting process's pid/uid/gid at connect time, which the process cannot forge); the socket
file's mode and group are defence in depth only. Each request is authorized against the access
rules before the backend sees it. Refusals are counted and logged on "keyagent.localapi" at
WARNING with who asked for what; no payload, key or secret is ever logged.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from agent.localapi.access import GROUP_SCOPED, AccessDenied, AccessPolicy, PeerCredentials
from agent.localapi.backend import KeyBackend
from agent.localapi.protocol import (
    LENGTH,
    Request,
    app_signing_input,
    check_length,
    decode_request,
    encode_error,
    encode_ok,
)
from agent.protocol.errors import InternalError, KeyfleetError, ProtocolError, TransportError
from agent.protocol.lifecycle import KeyKind

log = logging.getLogger("keyagent.localapi")

_UCRED = struct.Struct("3i")
_T = TypeVar("_T")


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The connecting process's pid/uid/gid as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


@dataclass
class _Conn:
    sock: socket.socket
    peer: PeerCredentials
    opened: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytearray = field(default_factory=bytearray)
    frame_started: float | None = None
    last_active: float = 0.0
    closing: bool = False  # answer what is queued, then close
    closing_done: bool = False


class LocalApiServer:
    """Serve the local API on ``socket_path`` until ``stop()``.

    Use ``start()`` for a background thread (the daemon), or ``serve_forever()`` in a thread of
    your own. ``counters()`` gives a snapshot: ``requests``, ``ok``, ``refused``,
    ``refused.<op>``, ``error.<check>``, ``connections``, ``busy``, ``timeouts``.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        policy: AccessPolicy,
        backend: KeyBackend,
        *,
        socket_mode: int = 0o660,
        socket_group: int | None = None,
        max_connections: int = 64,
        idle_timeout: float = 30.0,
        request_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.policy = policy
        self.backend = backend
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self._clock = clock
        self._counters: Counter[str] = Counter()
        self._counter_lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._connections: dict[int, _Conn] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"LocalApiServer({str(self.socket_path)!r}, {len(self._connections)} connections)"

    # -- lifecycle ------------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket file (parent directory too, mode 0755) and listen. A stale socket
        left by a crashed agent is replaced; a live one (another agent) or a non-socket file at
        the path is refused with ``TransportError``."""
        path = self.socket_path
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._remove_stale(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            # The file mode is set after bind(): for that instant the socket has the umask's
            # mode, which is harmless because every call is authorized by SO_PEERCRED anyway.
            os.chmod(path, self.socket_mode)
            if self.socket_group is not None:
                os.chown(path, -1, self.socket_group)
            listener.listen(32)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise TransportError(f"cannot serve local API on {path}: {exc.strerror}") from None
        self._listener = listener
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, None)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        log.info("local API listening on %s (mode %04o)", path, self.socket_mode)

    @staticmethod
    def _remove_stale(path: Path) -> None:
        try:
            info = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(info.st_mode):
            raise TransportError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise TransportError(
                    f"cannot probe existing socket {path}: {exc.strerror}"
                ) from None
            path.unlink(missing_ok=True)
            return
        finally:
            probe.close()
        raise TransportError(f"another process is serving {path}")

    def start(self) -> None:
        """Bind and serve in a daemon thread named "keyagent-localapi"."""
        if self._listener is None:
            self.bind()
        self._thread = threading.Thread(
            target=self.serve_forever, name="keyagent-localapi", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close every connection and remove the socket file."""
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._close_all()

    def __enter__(self) -> LocalApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def counters(self) -> dict[str, int]:
        with self._counter_lock:
            return dict(self._counters)

    def _count(self, *names: str) -> None:
        with self._counter_lock:
            for name in names:
                self._counters[name] += 1

    # -- the loop -------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        selector = self._selector
        if selector is None:  # bind() always sets it; a stop() before serving clears it
            return
        try:
            while not self._stopping.is_set():
                for key, events in selector.select(timeout=0.5):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    else:
                        conn = key.data
                        if events & selectors.EVENT_READ:
                            self._on_readable(conn)
                        if events & selectors.EVENT_WRITE and not conn.closing_done:
                            self._on_writable(conn)
                self._expire()
        except Exception:  # the thread must not die silently: log and let the daemon see it
            log.exception("local API server loop failed")
            raise
        finally:
            self._close_all()

    def _accept(self) -> None:
        if self._listener is None or self._selector is None:
            return
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("local API accept failed: %s", exc.strerror)
                return
            try:
                peer = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            self._count("connections")
            if len(self._connections) >= self.max_connections:
                self._count("busy")
                log.warning("local API busy: refused a connection from %s", peer)
                with contextlib.suppress(OSError):
                    sock.send(encode_error("api.busy", "too many connections, try again"))
                sock.close()
                continue
            sock.setblocking(False)
            now = self._clock()
            conn = _Conn(sock, peer, now, last_active=now)
            self._connections[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:
            self._close(conn)
            return
        now = self._clock()
        conn.last_active = now
        if conn.frame_started is None:
            conn.frame_started = now
        conn.inbuf += chunk
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Answer complete frames while nothing is waiting to be sent: one request at a time per
        connection, so a client that never reads its responses cannot make us buffer them."""
        while not conn.outbuf and not conn.closing and len(conn.inbuf) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(conn.inbuf)
            try:
                check_length(length)
            except ProtocolError as exc:
                # The stream cannot be resynchronized after a bad length: answer, then close.
                self._count(f"error.{exc.check}")
                log.info("local API: %s from %s: %s", exc.check, conn.peer, exc.reason)
                conn.outbuf += encode_error(exc.check, exc.reason)
                conn.closing = True
                conn.inbuf.clear()
                break
            if len(conn.inbuf) < LENGTH.size + length:
                break
            payload = bytes(conn.inbuf[LENGTH.size : LENGTH.size + length])
            del conn.inbuf[: LENGTH.size + length]
            conn.frame_started = self._clock() if conn.inbuf else None
            conn.outbuf += self.handle(conn.peer, payload)
        self._update_interest(conn)

    def _on_writable(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        del conn.outbuf[:sent]
        conn.last_active = self._clock()
        if not conn.outbuf:
            if conn.closing:
                self._close(conn)
                return
            self._process(conn)
        self._update_interest(conn)

    def _update_interest(self, conn: _Conn) -> None:
        if conn.closing_done or self._selector is None:
            return
        events = selectors.EVENT_WRITE if conn.outbuf else selectors.EVENT_READ
        self._selector.modify(conn.sock, events, conn)

    def _expire(self) -> None:
        now = self._clock()
        for conn in list(self._connections.values()):
            stalled = (
                conn.frame_started is not None and now - conn.frame_started > self.request_timeout
            )
            idle = now - conn.last_active > self.idle_timeout
            if stalled or idle:
                self._count("timeouts")
                log.info(
                    "local API: closing %s connection from %s",
                    "stalled" if stalled else "idle",
                    conn.peer,
                )
                self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn.closing_done:
            return
        conn.closing_done = True
        self._connections.pop(conn.sock.fileno(), None)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(conn.sock)
        conn.sock.close()

    def _close_all(self) -> None:
        for conn in list(self._connections.values()):
            self._close(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._listener is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
        self._listener = self._wake_r = self._wake_w = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None

    # -- one request ----------------------------------------------------------------------------

    def handle(self, peer: PeerCredentials, payload: bytes) -> bytes:
        """Decode, authorize and run one request; always returns one framed response."""
        self._count("requests")
        op = "?"
        try:
            request = decode_request(payload)
            op = request.op
            group = request.group if op in GROUP_SCOPED else None
            self.policy.check(peer, op, group)
            result = self._dispatch(peer, request)
        except AccessDenied as exc:
            self._count("refused", f"refused.{op}")
            log.warning("local API refused: %s", exc.reason)
            return encode_error(exc.check, exc.reason)
        except ProtocolError as exc:
            self._count(f"error.{exc.check}")
            log.info("local API %s from %s failed: [%s] %s", op, peer, exc.check, exc.reason)
            return encode_error(exc.check, exc.reason)
        except KeyfleetError as exc:
            # TPM, state or transport trouble inside the agent: the caller may retry later.
            self._count("error.api.unavailable")
            log.error("local API %s from %s: backend error: %s", op, peer, exc)
            return encode_error("api.unavailable", f"the agent could not {op} now: {exc}")
        except Exception:
            self._count("error.api.internal")
            log.exception("local API %s from %s: internal error", op, peer)
            return encode_error("api.internal", "internal error in keyagent (logged)")
        self._count("ok")
        log.debug("local API %s ok for %s", op, peer)
        return encode_ok(result)

    def _dispatch(self, peer: PeerCredentials, request: Request) -> object:
        b = self.backend
        op = request.op
        if op == "encrypt":
            return b.encrypt(_field(request.group), _field(request.data))
        if op == "decrypt":
            return b.decrypt(_field(request.group), _field(request.data))
        if op == "sign":
            return b.sign(app_signing_input(_field(request.data)))
        if op == "seal":
            b.seal(_field(request.name), _field(request.secret), peer.uid)
            return None
        if op == "unseal":
            return b.unseal(_field(request.name), peer.uid)
        if op == "list-keys":
            # App secrets of other uids are not listed: their names are the other app's business.
            return [
                r.to_cbor_map()
                for r in b.list_keys()
                if r.kind is not KeyKind.APP_SEAL or r.owner == peer.uid
            ]
        raise InternalError(f"decoded request has unhandled operation {op!r}")


def _field(value: _T | None) -> _T:
    """A field decode_request guarantees for this operation."""
    if value is None:
        raise InternalError("decoded request lacks a field its operation requires")
    return value

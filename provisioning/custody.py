"""Where the fleet's private keys live: a PKCS#11 token (the default) or, explicitly, a PEM file.

A key reference in configuration is either a file path or an RFC 7512 ``pkcs11:`` URI::

    pkcs11:token=keyfleet;object=service-signing?pin-source=file:/etc/keyfleet/token.pin
    pkcs11:token=keyfleet;id=%01?pin-source=env:KEYFLEET_TOKEN_PIN&module-path=/usr/lib/x.so

The path part picks the token (``token=``, its label) and the key (``object=``, its CKA_LABEL,
and/or ``id=``, its CKA_ID, percent-encoded). The PIN never sits in the URI: ``pin-source`` names
a file readable only by its owner (``file:PATH``) or an environment variable (``env:NAME``);
``pin-value`` is refused. ``module-path`` names the PKCS#11 library (default
``KEYFLEET_PKCS11_MODULE`` or Debian's SoftHSM2, ``/usr/lib/softhsm/libsofthsm2.so``).

``load_private_key`` returns a pyca ``ec.EllipticCurvePrivateKey`` either way, so code that signs
(certificates, CRLs, envelopes) never branches on where the key lives. A token key is
``TokenPrivateKey``: its ``sign`` hashes with SHA-256 here and runs CKM_ECDSA in the token (the
raw r||s answer becomes DER, like pyca's); it cannot be exported. One logged-in session per key,
used under a lock, serves every thread of the service. A file key is accepted with a warning
(``custody.file``): a copy of the service's files is then a copy of the key.

Refusals carry check ids (docs/checks.md): ``token.uri`` (malformed reference), ``token.pin``
(PIN source missing, unreadable, not private, or a PIN in clear), ``token.module`` (library cannot
be loaded), ``token.not_found`` (no such token or key, or several keys match), ``token.login``
(wrong PIN), ``token.key_type`` (not an EC P-256 key pair), ``token.export`` (private key asked
for, or a backup of a key made without backup), ``token.sign`` (the token refused to sign),
``token.exists`` (a label taken), ``token.import`` (a backed-up key that does not restore).

For ``keyfleet backup`` (provisioning.backup): a key made with ``backup=True`` leaves the token
only wrapped (``wrap_token_key``, CKM_AES_KEY_WRAP_PAD under a session-only AES key) and comes
back into a token non-extractable (``unwrap_into_token``).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, PKCS11Error
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters

from agent.configschema import Check, Problems, ReadableFile
from agent.protocol.errors import ConfigError
from provisioning import pki

log = logging.getLogger("keyfleet.custody")

DEFAULT_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
MODULE_ENV = "KEYFLEET_PKCS11_MODULE"
URI_SCHEME = "pkcs11:"
# RFC 7512 path attributes we use, and query attributes we understand.
_PATH_ATTRIBUTES = frozenset({"token", "object", "id", "type", "manufacturer", "serial", "model"})
_QUERY_ATTRIBUTES = frozenset({"pin-source", "module-path", "pin-value", "module-name"})
# A P-256 EC_POINT as the token returns it: DER OCTET STRING (0x04, length 65) of the point.
_EC_POINT_PREFIX = b"\x04\x41"


class CustodyError(ConfigError):
    """A key reference cannot be used. ``check`` is a stable id (docs/checks.md); the message
    never carries a PIN or key material."""

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"[{check}] {reason}")
        self.check = check
        self.reason = reason


# ---- references -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileKeyRef:
    """A PEM private key file (the explicit, warned-about option)."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class PinSource:
    """Where a token PIN is read from at load time: ``file`` (a path) or ``env`` (a variable
    name). Holds no PIN itself."""

    kind: str
    where: str

    def read(self) -> str:
        if self.kind == "env":
            value = os.environ.get(self.where)
            if not value:
                raise CustodyError("token.pin", f"environment variable {self.where} is not set")
            return value
        path = Path(self.where)
        try:
            info = path.stat()
        except OSError as exc:
            raise CustodyError("token.pin", f"PIN file {path}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise CustodyError("token.pin", f"PIN file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise CustodyError(
                "token.pin",
                f"PIN file {path} is readable by others (mode {info.st_mode & 0o777:o})",
            )
        try:
            value = path.read_text().strip()
        except (OSError, UnicodeDecodeError):
            raise CustodyError("token.pin", f"PIN file {path} cannot be read") from None
        if not value:
            raise CustodyError("token.pin", f"PIN file {path} is empty")
        return value

    def __str__(self) -> str:
        return f"{self.kind}:{self.where}"


@dataclass(frozen=True)
class TokenKeyRef:
    """A key pair in a PKCS#11 token: the token's label, the key's label and/or id, where the
    PIN comes from and which library speaks to the token. ``uri`` is the reference as written
    (it never holds a PIN: ``pin-value`` is refused)."""

    uri: str
    token: str
    label: str | None
    key_id: bytes | None
    pin: PinSource | None = field(default=None)
    module: Path = DEFAULT_MODULE

    def __str__(self) -> str:
        return self.uri

    def with_pin(self, pin: PinSource) -> TokenKeyRef:
        return TokenKeyRef(self.uri, self.token, self.label, self.key_id, pin, self.module)


KeyRef = FileKeyRef | TokenKeyRef


def _pct(value: str, name: str) -> bytes:
    try:
        return unquote_to_bytes(value)
    except ValueError:
        raise CustodyError("token.uri", f"{name} is not percent-encoded correctly") from None


def _text(value: str, name: str) -> str:
    try:
        return _pct(value, name).decode("utf-8")
    except UnicodeDecodeError:
        raise CustodyError("token.uri", f"{name} is not UTF-8") from None


def parse_token_uri(uri: str, *, base: Path | None = None) -> TokenKeyRef:
    """An RFC 7512 ``pkcs11:`` URI naming a key; relative PIN-file and module paths are
    resolved against ``base``. Raises ``CustodyError`` (``token.uri``, ``token.pin``)."""
    if not uri.startswith(URI_SCHEME):
        raise CustodyError("token.uri", "a PKCS#11 key reference starts with pkcs11:")
    body = uri[len(URI_SCHEME) :]
    path_part, _, query_part = body.partition("?")
    path: dict[str, str] = {}
    for item in filter(None, path_part.split(";")):
        name, sep, value = item.partition("=")
        if not sep or name not in _PATH_ATTRIBUTES:
            raise CustodyError("token.uri", f"unknown or malformed path attribute {name!r}")
        if name in path:
            raise CustodyError("token.uri", f"path attribute {name} given twice")
        path[name] = value
    query: dict[str, str] = {}
    for item in filter(None, query_part.split("&")):
        name, sep, value = item.partition("=")
        if not sep or name not in _QUERY_ATTRIBUTES:
            # the value is not shown: it might be a PIN under a misspelt name
            raise CustodyError("token.uri", f"unknown or malformed query attribute {name!r}")
        if name in query:
            raise CustodyError("token.uri", f"query attribute {name} given twice")
        query[name] = value
    if "pin-value" in query:
        raise CustodyError(
            "token.pin",
            "a PIN in the key reference (pin-value) is refused: use pin-source=file:PATH "
            "(a file readable only by its owner) or pin-source=env:NAME",
        )
    if "module-name" in query:
        raise CustodyError("token.uri", "module-name is not supported: give module-path")
    if "token" not in path:
        raise CustodyError("token.uri", "the token's label (token=...) is needed")
    if "object" not in path and "id" not in path:
        raise CustodyError("token.uri", "the key's label (object=...) or id (id=...) is needed")
    if path.get("type", "private") != "private":
        raise CustodyError("token.uri", "a signing key reference names a private key")

    def resolve(value: str) -> Path:
        p = Path(value)
        if not p.is_absolute():
            if base is None:
                raise CustodyError("token.uri", f"{value} must be an absolute path")
            p = base / p
        return p

    pin: PinSource | None = None
    if "pin-source" in query:
        source = _text(query["pin-source"], "pin-source")
        kind, sep, where = source.partition(":")
        if kind == "env" and sep and where:
            pin = PinSource("env", where)
        elif kind == "file" and sep and where:
            pin = PinSource("file", str(resolve(where.removeprefix("//"))))
        elif source.startswith("/") or (base is not None and not sep):
            pin = PinSource("file", str(resolve(source)))
        else:
            raise CustodyError("token.uri", "pin-source is file:PATH or env:NAME")
    default_module = os.environ.get(MODULE_ENV) or str(DEFAULT_MODULE)
    module = resolve(_text(query.get("module-path", ""), "module-path") or default_module)
    return TokenKeyRef(
        uri=uri,
        token=_text(path["token"], "token"),
        label=_text(path["object"], "object") if "object" in path else None,
        key_id=_pct(path["id"], "id") if "id" in path else None,
        pin=pin,
        module=module,
    )


def parse_key_ref(value: str, *, base: Path | None = None) -> KeyRef:
    """A key reference as written in configuration or on a command line: a ``pkcs11:`` URI or a
    file path (relative to ``base`` when given)."""
    if value.startswith(URI_SCHEME):
        return parse_token_uri(value, base=base)
    path = Path(value)
    if not path.is_absolute() and base is not None:
        path = base / path
    return FileKeyRef(path)


class KeyReference(Check):
    """Configuration check for a key reference: a private PEM file (checked like any private key
    file: readable, no group/other permission bits) or a ``pkcs11:`` URI with a PIN source. The
    token itself is reached only when the key is loaded (``load_private_key``)."""

    expected = "a private key: a pkcs11: URI (token=...;object=...?pin-source=...) or a file"

    def __init__(self, *, base: Path | None = None) -> None:
        self.base = base
        self._file = ReadableFile(
            "a private key file readable only by its owner", private=True, base=base
        )

    def check(self, key: str, value: object, problems: Problems) -> object:
        if isinstance(value, str) and value.startswith(URI_SCHEME):
            try:
                ref = parse_token_uri(value, base=self.base)
            except CustodyError as exc:
                # the URI holds no PIN (pin-value is what is refused), but show only its check
                return problems.bad(key, "pkcs11:…", f"{self.expected} ({exc})")
            if ref.pin is None:
                return problems.bad(
                    key, value, f"{self.expected} (no pin-source: file:PATH or env:NAME)"
                )
            return ref
        path = self._file.check(key, value, problems)
        return FileKeyRef(path) if isinstance(path, Path) else path


# ---- loading ------------------------------------------------------------------------------


_libs: dict[str, Any] = {}
_libs_lock = threading.Lock()
# (module, token label) -> HMAC of the PIN that logged in, under a key of this process only
_logins: dict[tuple[str, str], bytes] = {}
_PIN_MAC_KEY = secrets.token_bytes(32)


def _library(module: Path) -> Any:
    """The loaded PKCS#11 library (one per module path and process: C_Initialize runs once)."""
    with _libs_lock:
        lib = _libs.get(str(module))
        if lib is None:
            if not module.is_file():
                raise CustodyError("token.module", f"no PKCS#11 library at {module}")
            try:
                lib = pkcs11.lib(str(module))
            except (pkcs11.PKCS11Error, OSError, RuntimeError) as exc:
                raise CustodyError(
                    "token.module", f"cannot load {module}: {type(exc).__name__}"
                ) from None
            _libs[str(module)] = lib
        return lib


def refresh_modules() -> None:
    """Re-initialise every loaded PKCS#11 library, so that tokens made since it was loaded (by
    ``softhsm2-util`` in the same process's lifetime, e.g. in tests) become visible. Sessions of
    keys loaded before are closed by this: load them again."""
    with _libs_lock:
        for lib in _libs.values():
            lib.reinitialize()
        _logins.clear()


def open_session(ref: TokenKeyRef, *, rw: bool = False) -> Any:
    """A logged-in session on the token ``ref`` names (``token.not_found``, ``token.login``)."""
    if ref.pin is None:
        raise CustodyError("token.pin", f"no pin-source for {ref.uri}")
    lib = _library(ref.module)
    try:
        token = lib.get_token(token_label=ref.token)
    except p11.NoSuchToken:
        raise CustodyError("token.not_found", f"no token labelled {ref.token!r}") from None
    except p11.MultipleTokensReturned:
        raise CustodyError("token.not_found", f"several tokens labelled {ref.token!r}") from None
    pin = ref.pin.read()
    seen = (str(ref.module), ref.token)
    digest = hmac.new(_PIN_MAC_KEY, pin.encode(), hashlib.sha256).digest()
    try:
        session = token.open(user_pin=pin, rw=rw)
        with _libs_lock:
            _logins[seen] = digest
        return session
    except p11.UserAlreadyLoggedIn:
        # PKCS#11 login is per process and token: another key of this process holds a session
        # that logged in already and a new session shares it. The token cannot check this PIN
        # then, so it must be the one that logged in (kept only as a keyed digest).
        with _libs_lock:
            known = _logins.get(seen)
        if known is None or not hmac.compare_digest(known, digest):
            raise CustodyError("token.login", f"the PIN from {ref.pin} was refused") from None
        return token.open(rw=rw)
    except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
        raise CustodyError("token.login", f"the PIN from {ref.pin} was refused") from None
    except pkcs11.PKCS11Error as exc:
        raise CustodyError("token.login", f"cannot log in: {type(exc).__name__}") from None
    finally:
        del pin


def _find(session: Any, ref: TokenKeyRef, object_class: Any) -> Any:
    template: dict[Any, Any] = {Attribute.CLASS: object_class, Attribute.KEY_TYPE: KeyType.EC}
    if ref.label is not None:
        template[Attribute.LABEL] = ref.label
    if ref.key_id is not None:
        template[Attribute.ID] = ref.key_id
    found = list(session.get_objects(template))
    what = ref.label if ref.label is not None else (ref.key_id or b"").hex()
    if not found:
        raise CustodyError("token.not_found", f"no EC key {what!r} in token {ref.token!r}")
    if len(found) > 1:
        raise CustodyError("token.not_found", f"several EC keys match {what!r}")
    return found[0]


def public_key_of(public_object: Any) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of a token public-key object (``token.key_type`` otherwise)."""
    point = bytes(public_object[Attribute.EC_POINT])
    if not point.startswith(_EC_POINT_PREFIX) or len(point) != 67:
        raise CustodyError("token.key_type", "not an EC P-256 key (EC_POINT)")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point[2:])
    except ValueError:
        raise CustodyError("token.key_type", "not an EC P-256 key (EC_POINT)") from None


class TokenPrivateKey(ec.EllipticCurvePrivateKey):
    """A P-256 private key that stays in a PKCS#11 token, usable wherever pyca wants an
    ``EllipticCurvePrivateKey``: ``sign`` hashes with SHA-256 and runs CKM_ECDSA in the token
    (DER result, like pyca); ``exchange``, ``private_numbers`` and ``private_bytes`` refuse. One
    session per key, used under a lock (the service signs from several threads)."""

    def __init__(self, ref: TokenKeyRef, session: Any, handle: Any, public: Any) -> None:
        self.ref = ref
        self._session = session
        self._handle = handle
        self._public_key = public
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        what = self.ref.label if self.ref.label is not None else (self.ref.key_id or b"").hex()
        return f"TokenPrivateKey(token={self.ref.token!r}, key={what!r})"

    def close(self) -> None:
        with self._lock:
            self._session.close()

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise CustodyError("token.sign", "only ECDSA signatures are supported")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            if algorithm.digest_size != 32:
                raise CustodyError("token.sign", "only SHA-256 digests are supported")
            digest = bytes(data)
        else:
            if not isinstance(algorithm, hashes.SHA256):
                raise CustodyError("token.sign", "only ECDSA with SHA-256 is supported")
            h = hashes.Hash(hashes.SHA256())
            h.update(bytes(data))
            digest = h.finalize()
        try:
            with self._lock:
                raw = self._handle.sign(digest, mechanism=Mechanism.ECDSA)
        except PKCS11Error as exc:
            raise CustodyError("token.sign", f"the token refused: {type(exc).__name__}") from None
        if len(raw) != 64:
            raise CustodyError("token.sign", f"unexpected signature length {len(raw)}")
        return encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key  # type: ignore[no-any-return]

    @property
    def curve(self) -> ec.EllipticCurve:
        return ec.SECP256R1()

    @property
    def key_size(self) -> int:
        return 256

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise CustodyError("token.sign", "a fleet signing key does not do ECDH")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise CustodyError("token.export", "a token-resident private key cannot be exported")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise CustodyError("token.export", "a token-resident private key cannot be exported")

    def __copy__(self) -> TokenPrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> TokenPrivateKey:
        return self


def load_token_key(ref: TokenKeyRef) -> TokenPrivateKey:
    """Log in to the token and find the key pair ``ref`` names."""
    session = open_session(ref)
    try:
        private = _find(session, ref, ObjectClass.PRIVATE_KEY)
        public = public_key_of(_find(session, ref, ObjectClass.PUBLIC_KEY))
    except BaseException:
        session.close()
        raise
    return TokenPrivateKey(ref, session, private, public)


def load_private_key(
    ref: KeyRef | str | os.PathLike[str], *, password: bytes | None = None, role: str = "fleet"
) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key ``ref`` names: a ``TokenPrivateKey`` for a ``pkcs11:`` URI, or a
    PEM file's key (encrypted with ``password`` if given), with a ``custody.file`` warning naming
    ``role`` (e.g. "service signing"): a file key is only as safe as the file."""
    if not isinstance(ref, FileKeyRef | TokenKeyRef):
        ref = parse_key_ref(os.fspath(ref))
    if isinstance(ref, TokenKeyRef):
        return load_token_key(ref)
    log.warning(
        "custody.file: the %s key is a plain file (%s); anyone who copies the file holds the key: "
        "keep fleet keys in a PKCS#11 token (docs/operations.md)",
        role,
        ref.path,
    )
    try:
        data = ref.path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {role} key {ref.path}: {exc.strerror}") from None
    return pki.key_from_pem(data, password)


def describe(ref: KeyRef) -> str:
    """Where a key lives, for logs and status: ``file /path`` or ``token 'L' slot N, key 'K'``
    (the slot is looked up when the library is loadable)."""
    if isinstance(ref, FileKeyRef):
        return f"file {ref.path}"
    what = f"key {ref.label!r}" if ref.label is not None else f"key id {(ref.key_id or b'').hex()}"
    slot = ""
    try:
        token = _library(ref.module).get_token(token_label=ref.token)
        slot = f" slot {token.slot.slot_id}"
    except Exception:  # describe is for messages: an unreachable token still gets described
        slot = ""
    return f"token {ref.token!r}{slot}, {what}"


def same_key(a: KeyRef, b: KeyRef) -> bool:
    """True when both references name the same file or the same token object."""
    if isinstance(a, FileKeyRef) and isinstance(b, FileKeyRef):
        try:
            return a.path.resolve() == b.path.resolve() or a.path.samefile(b.path)
        except OSError:
            return a.path.resolve() == b.path.resolve()
    if isinstance(a, TokenKeyRef) and isinstance(b, TokenKeyRef):
        return (a.module, a.token, a.label, a.key_id) == (b.module, b.token, b.label, b.key_id)
    return False


def _require_free(session: Any, ref: TokenKeyRef) -> None:
    """No key (private or public) of ``ref``'s label/id is in the token yet (``token.exists``):
    a new or restored key never shadows one already there."""
    for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        try:
            _find(session, ref, cls)
        except CustodyError as exc:
            if "several" in exc.reason:
                raise CustodyError("token.exists", "keys of that label exist already") from None
            continue
        raise CustodyError("token.exists", f"a key {ref.label!r} exists already in the token")


def generate_token_key(ref: TokenKeyRef, *, backup: bool = False) -> ec.EllipticCurvePublicKey:
    """Make a P-256 key pair inside the token, labelled (and id'd) as ``ref`` says: private half
    CKA_SENSITIVE, token-resident, and not CKA_EXTRACTABLE unless ``backup``: then the token
    lets it out only wrapped under another key (``wrap_token_key``, for ``keyfleet backup``),
    never in the clear (CKA_SENSITIVE holds). Refuses when a key of that label/id already exists
    (``token.exists``). Returns the public key."""
    session = open_session(ref, rw=True)
    try:
        _require_free(session, ref)
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
            local=True,
        )
        ident = ref.key_id if ref.key_id is not None else (ref.label or "").encode()
        public, _private = params.generate_keypair(
            store=True,
            label=ref.label,
            id=ident,
            private_template={
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: backup,
                Attribute.PRIVATE: True,
                Attribute.SIGN: True,
                Attribute.DERIVE: False,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
            },
        )
        return public_key_of(public)
    finally:
        session.close()


@dataclass(frozen=True)
class TokenKeyFacts:
    """The public facts of a key pair in a token, for the inventory (``keyfleet keys list``):
    where it is (token label, slot, the key's label and CKA_ID), and its public key. Read from
    the public-key object; of the private one only its presence is checked (by label/id and
    class), none of its attributes is read."""

    token: str
    slot: int
    label: str | None
    key_id: bytes
    public_key: ec.EllipticCurvePublicKey


def token_key_facts(ref: TokenKeyRef) -> TokenKeyFacts:
    """Log in to the token ``ref`` names (as ``load_private_key`` does: the PIN from its
    ``pin-source``) and read the public facts of the key pair (``token.not_found`` when either
    half is missing, ``token.key_type`` when it is not P-256)."""
    session = open_session(ref)
    try:
        _find(session, ref, ObjectClass.PRIVATE_KEY)
        public_object = _find(session, ref, ObjectClass.PUBLIC_KEY)
        public = public_key_of(public_object)
        try:
            label: str | None = str(public_object[Attribute.LABEL])
        except PKCS11Error:
            label = ref.label
        try:
            ident = bytes(public_object[Attribute.ID])
        except PKCS11Error:
            ident = ref.key_id or b""
        return TokenKeyFacts(ref.token, int(session.token.slot.slot_id), label, ident, public)
    except PKCS11Error as exc:
        raise CustodyError(
            "token.not_found", f"cannot read the key: {type(exc).__name__}"
        ) from None
    finally:
        session.close()


# ---- backup: wrapped export and import (provisioning.backup) ----------------------------------


def token_key_labels(ref: TokenKeyRef) -> list[str]:
    """The labels of every EC private key in the token ``ref`` names (its key part is ignored),
    sorted; a key without a label is a ``token.not_found`` (a backup could not name it)."""
    session = open_session(ref)
    try:
        labels: list[str] = []
        template = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC}
        for obj in session.get_objects(template):
            try:
                labels.append(str(obj[Attribute.LABEL]))
            except PKCS11Error:
                raise CustodyError("token.not_found", "a key in the token has no label") from None
        return sorted(labels)
    finally:
        session.close()


def _session_aes_key(session: Any, value: bytes, *, wrap: bool) -> Any:
    """A session-only AES key with ``value``, able to wrap (or unwrap) and nothing else."""
    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: value,
            Attribute.TOKEN: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.WRAP: wrap,
            Attribute.UNWRAP: not wrap,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
        }
    )


def wrap_token_key(ref: TokenKeyRef, wrapping_key: bytes) -> tuple[bytes, bytes, bytes]:
    """The private key ``ref`` names, wrapped in the token (C_WrapKey, CKM_AES_KEY_WRAP_PAD,
    RFC 5649) under the AES-256 ``wrapping_key``, which enters the token as a session object
    only; with its CKA_ID and public point (65 bytes). A key made without backup (not
    CKA_EXTRACTABLE) is a ``token.export`` naming it."""
    session = open_session(ref)
    try:
        private = _find(session, ref, ObjectClass.PRIVATE_KEY)
        public = public_key_of(_find(session, ref, ObjectClass.PUBLIC_KEY))
        what = ref.label if ref.label is not None else (ref.key_id or b"").hex()
        if not bool(private[Attribute.EXTRACTABLE]):
            raise CustodyError(
                "token.export",
                f"key {what!r} in token {ref.token!r} was made not extractable, so it cannot be "
                "backed up: make the fleet's keys with backup enabled (keyfleet pki init --token "
                "... --backup, or pki token-key --backup) and re-issue what they signed",
            )
        ident = bytes(private[Attribute.ID])
        wrapper = _session_aes_key(session, wrapping_key, wrap=True)
        try:
            wrapped = wrapper.wrap_key(private, mechanism=Mechanism.AES_KEY_WRAP_PAD)
        except PKCS11Error as exc:
            raise CustodyError(
                "token.export", f"the token would not wrap {what!r}: {type(exc).__name__}"
            ) from None
        finally:
            wrapper.destroy()
        point = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return bytes(wrapped), ident, point
    finally:
        session.close()


def unwrap_into_token(
    ref: TokenKeyRef, wrapped: bytes, public_point: bytes, wrapping_key: bytes
) -> None:
    """Import a key pair made by ``wrap_token_key`` (or wrapped the same way from a PKCS#8
    file key) into the token ``ref`` names, under ``ref``'s label and id: the private half
    sensitive and not extractable, the public half from ``public_point``. The unwrapped key must
    sign for that public key, or nothing stays in the token (``token.import``). A key of that
    label already there is ``token.exists``."""
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_point)
    session = open_session(ref, rw=True)
    made: list[Any] = []
    try:
        _require_free(session, ref)
        ident = ref.key_id if ref.key_id is not None else (ref.label or "").encode()
        unwrapper = _session_aes_key(session, wrapping_key, wrap=False)
        try:
            private = unwrapper.unwrap_key(
                ObjectClass.PRIVATE_KEY,
                KeyType.EC,
                wrapped,
                id=ident,
                label=ref.label,
                mechanism=Mechanism.AES_KEY_WRAP_PAD,
                store=True,
                template={
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                    Attribute.SIGN: True,
                    Attribute.DERIVE: False,
                    Attribute.DECRYPT: False,
                    Attribute.UNWRAP: False,
                    # public-key capabilities python-pkcs11 would add: a private key has none
                    Attribute.ENCRYPT: pkcs11.DEFAULT,
                    Attribute.VERIFY: pkcs11.DEFAULT,
                    Attribute.WRAP: pkcs11.DEFAULT,
                },
            )
        except PKCS11Error as exc:
            raise CustodyError(
                "token.import", f"the token would not unwrap {ref.label!r}: {type(exc).__name__}"
            ) from None
        finally:
            unwrapper.destroy()
        made.append(private)
        made.append(
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.KEY_TYPE: KeyType.EC,
                    Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1"),
                    Attribute.EC_POINT: _EC_POINT_PREFIX + public_point,
                    Attribute.TOKEN: True,
                    Attribute.VERIFY: True,
                    Attribute.LABEL: ref.label,
                    Attribute.ID: ident,
                }
            )
        )
        probe = hashlib.sha256(b"keyfleet restore probe " + ident).digest()
        raw = private.sign(probe, mechanism=Mechanism.ECDSA)
        signature = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
        try:
            public.verify(signature, probe, ec.ECDSA(Prehashed(hashes.SHA256())))
        except InvalidSignature:
            raise CustodyError(
                "token.import", f"the key unwrapped as {ref.label!r} is not its recorded key"
            ) from None
        made.clear()
    except PKCS11Error as exc:
        raise CustodyError(
            "token.import", f"cannot import {ref.label!r}: {type(exc).__name__}"
        ) from None
    finally:
        for obj in made:
            with suppress(PKCS11Error):
                obj.destroy()
        session.close()


def remove_token_key(ref: TokenKeyRef) -> None:
    """Destroy the key pair ``ref`` names (both halves, whichever exist): only to undo a restore
    that failed half-way, so that a restore is all or nothing."""
    session = open_session(ref, rw=True)
    try:
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            with suppress(CustodyError):
                _find(session, ref, cls).destroy()
    finally:
        session.close()

"""TPM key blobs in the "TSS2 PRIVATE KEY" PEM format (the ASN.1 used by tpm2-openssl,
tpm2-tss-engine and openssl_tpm2_engine), with a minimal, strict DER encoder and decoder.

    TPMKey ::= SEQUENCE {
        type        OBJECT IDENTIFIER,          -- 2.23.133.10.1.3 loadable key, .5 sealed data
        emptyAuth   [0] EXPLICIT BOOLEAN OPTIONAL,
        policy      [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL,
        parent      INTEGER,                    -- 0x40000001: a primary re-created under owner
        pubkey      OCTET STRING,               -- marshalled TPM2B_PUBLIC
        privkey     OCTET STRING }              -- marshalled TPM2B_PRIVATE (TPM-wrapped)
    TPMPolicy ::= SEQUENCE {
        commandCode   [0] EXPLICIT INTEGER,
        commandPolicy [1] EXPLICIT OCTET STRING }

A key made under one of the agent's rotating parents (``agent.tpm.parents``) has that parent's
persistent handle in ``parent`` and the parent's TPM Name in the format's ``description`` field
(``[4] EXPLICIT UTF8String``), written as ``parent-name:<hex>`` so a person reading the blob
sees it and other tools that load TSS2 keys ignore it. With the Name the agent tells "the parent
this blob was made under was evicted, the handle now holds a newer one" from "damaged blob".
The other optional fields ([2] secret, [3] authPolicy, [5] rsaParent) and any other
description are refused: keyfleet never writes them, and a decoder that skipped them would
half-understand a key. The ``policy`` entries are kept as they are; what they mean is read by
the code that sealed them: PolicyPCR (here), PolicyNV (``agent.tpm.nvcounter``), PolicyAuthorize
(``agent.tpm.authorized``).

Nothing here is secret in the clear (the private part is encrypted by the parent's seed), but the
private bytes are kept out of reprs anyway. No TPM command is issued in this module.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass, field
from pathlib import Path

from agent.fsio import atomic_write
from agent.protocol.errors import StateError

OID_LOADABLE_KEY = "2.23.133.10.1.3"
OID_SEALED_DATA = "2.23.133.10.1.5"
PARENT_OWNER = 0x40000001
TPM2_CC_POLICY_PCR = 0x0000017F

PEM_LABEL = "TSS2 PRIVATE KEY"
MAX_BLOB_SIZE = 16 * 1024

_TAG_BOOLEAN = 0x01
_TAG_INTEGER = 0x02
_TAG_OCTET_STRING = 0x04
_TAG_OID = 0x06
_TAG_SEQUENCE = 0x30
_TAG_UTF8 = 0x0C
_CTX0 = 0xA0
_CTX1 = 0xA1
_CTX4 = 0xA4
_PARENT_NAME_PREFIX = "parent-name:"


@dataclass(frozen=True)
class PolicyCommand:
    """One TPMPolicy entry: a policy command code and its marshalled parameters."""

    command_code: int
    command_policy: bytes


@dataclass(frozen=True)
class KeyBlob:
    """A TPM object as stored on disk: public area and TPM-wrapped private area."""

    public: bytes
    private: bytes = field(repr=False)
    parent: int = PARENT_OWNER
    sealed: bool = False
    empty_auth: bool = True
    policy: tuple[PolicyCommand, ...] = ()
    parent_name: bytes = b""  # the TPM Name of a persistent parent; empty for the SRK

    def to_der(self) -> bytes:
        oid = OID_SEALED_DATA if self.sealed else OID_LOADABLE_KEY
        body = _encode_oid(oid)
        if self.empty_auth:
            body += _tlv(_CTX0, _tlv(_TAG_BOOLEAN, b"\xff"))
        if self.policy:
            entries = b"".join(
                _tlv(
                    _TAG_SEQUENCE,
                    _tlv(_CTX0, _encode_int(p.command_code))
                    + _tlv(_CTX1, _tlv(_TAG_OCTET_STRING, p.command_policy)),
                )
                for p in self.policy
            )
            body += _tlv(_CTX1, _tlv(_TAG_SEQUENCE, entries))
        if self.parent_name:
            text = (_PARENT_NAME_PREFIX + self.parent_name.hex()).encode("ascii")
            body += _tlv(_CTX4, _tlv(_TAG_UTF8, text))
        body += _encode_int(self.parent)
        body += _tlv(_TAG_OCTET_STRING, self.public)
        body += _tlv(_TAG_OCTET_STRING, self.private)
        return _tlv(_TAG_SEQUENCE, body)

    def to_pem(self) -> bytes:
        b64 = base64.b64encode(self.to_der()).decode("ascii")
        lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
        return (
            f"-----BEGIN {PEM_LABEL}-----\n" + "\n".join(lines) + f"\n-----END {PEM_LABEL}-----\n"
        ).encode("ascii")

    @classmethod
    def from_der(cls, data: bytes) -> KeyBlob:
        return _decode_key(data)

    @classmethod
    def from_pem(cls, data: bytes) -> KeyBlob:
        if len(data) > MAX_BLOB_SIZE:
            raise StateError(f"key blob is {len(data)} bytes, more than {MAX_BLOB_SIZE}")
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise StateError("key blob is not a PEM text file") from None
        begin, end = f"-----BEGIN {PEM_LABEL}-----", f"-----END {PEM_LABEL}-----"
        if not text.startswith(begin):
            raise StateError(f"key blob does not start with '{begin}'")
        if not text.endswith(end):
            raise StateError(f"key blob does not end with '{end}' (truncated?)")
        b64 = "".join(text[len(begin) : -len(end)].split())
        try:
            der = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise StateError("key blob has invalid base64 inside its PEM armour") from None
        return _decode_key(der)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the PEM atomically (agent.fsio.atomic_write), mode 0600."""
        atomic_write(path, self.to_pem())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyBlob:
        target = Path(path)
        try:
            with open(target, "rb") as handle:
                data = handle.read(MAX_BLOB_SIZE + 1)
        except OSError as exc:
            raise StateError(f"could not read key blob {target}: {exc.strerror or exc}") from None
        try:
            return cls.from_pem(data)
        except StateError as exc:
            raise StateError(f"{target}: {exc}") from None


def pcr_policy(pcr_digest: bytes, pcr_selection: bytes) -> PolicyCommand:
    """The TPMPolicy entry for PolicyPCR: TPM2B_DIGEST pcrDigest || TPML_PCR_SELECTION."""
    return PolicyCommand(
        TPM2_CC_POLICY_PCR, len(pcr_digest).to_bytes(2, "big") + pcr_digest + pcr_selection
    )


# --- DER encoding ---------------------------------------------------------------------------


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _length(len(value)) + value


def _encode_int(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative integers are not used in key blobs")
    raw = value.to_bytes(value.bit_length() // 8 + 1, "big")  # leading 0 keeps it positive
    return _tlv(_TAG_INTEGER, raw)


def _encode_oid(oid: str) -> bytes:
    arcs = [int(a) for a in oid.split(".")]
    out = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return _tlv(_TAG_OID, bytes(out))


# --- strict DER decoding --------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, reason: str) -> StateError:
        return StateError(f"key blob is malformed: {self.what}: {reason}")

    def at_end(self) -> bool:
        return self.pos == len(self.data)

    def peek_tag(self) -> int | None:
        return None if self.at_end() else self.data[self.pos]

    def read(self, tag: int) -> bytes:
        if self.at_end():
            raise self.fail(f"expected tag 0x{tag:02x}, found end of data (truncated)")
        found = self.data[self.pos]
        if found != tag:
            raise self.fail(f"expected tag 0x{tag:02x}, found 0x{found:02x}")
        pos = self.pos + 1
        if pos >= len(self.data):
            raise self.fail("length missing (truncated)")
        first = self.data[pos]
        pos += 1
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 3:
                raise self.fail("unsupported length encoding")
            raw = self.data[pos : pos + count]
            if len(raw) != count:
                raise self.fail("length cut off (truncated)")
            length = int.from_bytes(raw, "big")
            if raw[0] == 0 or length < 0x80:
                raise self.fail("length not in minimal DER form")
            pos += count
        end = pos + length
        if end > len(self.data):
            raise self.fail(f"value needs {length} bytes, {len(self.data) - pos} left (truncated)")
        self.pos = end
        return self.data[pos:end]

    def done(self) -> None:
        if not self.at_end():
            raise self.fail(f"{len(self.data) - self.pos} unexpected trailing bytes")


def _decode_int(raw: bytes, reader: _Reader) -> int:
    if not raw:
        raise reader.fail("empty INTEGER")
    if raw[0] & 0x80:
        raise reader.fail("negative INTEGER")
    if len(raw) > 1 and raw[0] == 0 and not raw[1] & 0x80:
        raise reader.fail("INTEGER not in minimal form")
    if len(raw) > 9:
        raise reader.fail("INTEGER too large")
    return int.from_bytes(raw, "big")


def _decode_key(data: bytes) -> KeyBlob:
    if len(data) > MAX_BLOB_SIZE:
        raise StateError(f"key blob is {len(data)} bytes, more than {MAX_BLOB_SIZE}")
    outer = _Reader(data, "TPMKey")
    seq = _Reader(outer.read(_TAG_SEQUENCE), "TPMKey")
    outer.done()
    oid_raw = seq.read(_TAG_OID)
    if oid_raw == _encode_oid(OID_LOADABLE_KEY)[2:]:
        sealed = False
    elif oid_raw == _encode_oid(OID_SEALED_DATA)[2:]:
        sealed = True
    else:
        raise seq.fail("type is not a loadable TPM key (2.23.133.10.1.3) nor sealed data (.1.5)")
    empty_auth = False
    if seq.peek_tag() == _CTX0:
        inner = _Reader(seq.read(_CTX0), "emptyAuth")
        value = inner.read(_TAG_BOOLEAN)
        inner.done()
        if value not in (b"\x00", b"\xff"):
            raise inner.fail("BOOLEAN not in DER form")
        empty_auth = value == b"\xff"
    policy: list[PolicyCommand] = []
    if seq.peek_tag() == _CTX1:
        wrapper = _Reader(seq.read(_CTX1), "policy")
        entries = _Reader(wrapper.read(_TAG_SEQUENCE), "policy")
        wrapper.done()
        while not entries.at_end():
            entry = _Reader(entries.read(_TAG_SEQUENCE), "TPMPolicy")
            code_wrap = _Reader(entry.read(_CTX0), "commandCode")
            code = _decode_int(code_wrap.read(_TAG_INTEGER), code_wrap)
            code_wrap.done()
            pol_wrap = _Reader(entry.read(_CTX1), "commandPolicy")
            command_policy = pol_wrap.read(_TAG_OCTET_STRING)
            pol_wrap.done()
            entry.done()
            policy.append(PolicyCommand(code, command_policy))
        if not policy:
            raise seq.fail("empty policy sequence")
    parent_name = b""
    if seq.peek_tag() == _CTX4:
        wrapper = _Reader(seq.read(_CTX4), "description")
        text = wrapper.read(_TAG_UTF8)
        wrapper.done()
        parent_name = _decode_parent_name(text, wrapper)
    tag = seq.peek_tag()
    if tag is not None and tag & 0xE0 == 0xA0:
        raise seq.fail(f"optional field [{tag & 0x1F}] is not supported by keyfleet")
    parent = _decode_int(seq.read(_TAG_INTEGER), seq)
    public = seq.read(_TAG_OCTET_STRING)
    private = seq.read(_TAG_OCTET_STRING)
    seq.done()
    for name, value in (("pubkey", public), ("privkey", private)):
        if len(value) < 2 or int.from_bytes(value[:2], "big") != len(value) - 2:
            raise StateError(f"key blob is malformed: {name} is not a well-formed TPM2B")
    return KeyBlob(
        public=public,
        private=private,
        parent=parent,
        sealed=sealed,
        empty_auth=empty_auth,
        policy=tuple(policy),
        parent_name=parent_name,
    )


def _decode_parent_name(text: bytes, reader: _Reader) -> bytes:
    prefix = _PARENT_NAME_PREFIX.encode("ascii")
    if not text.startswith(prefix):
        raise reader.fail("only a 'parent-name:<hex>' description is understood")
    digits = text[len(prefix) :]
    try:
        name = bytes.fromhex(digits.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise reader.fail("parent name is not hex") from None
    # a TPM Name: a 2-byte hash algorithm id and a digest (SHA-256 for keyfleet's parents)
    if len(name) != 34 or name[:2] != b"\x00\x0b" or digits != digits.lower():
        raise reader.fail("parent name is not a lower-case SHA-256 TPM Name")
    return name

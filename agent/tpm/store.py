"""The device's TPM key store: a thin adapter over tpm2-pytss ESAPI.

All TPM traffic of the agent goes through ``TPMStore``; it counts every command it issues
(``commands_issued``) because a real TPM chip takes 30-300 ms per ECC operation and the protocol
budgets TPM commands (a commit costs a device at most one). Every tpm2-pytss error becomes a
``TPMError`` with the decoded response code. Transient objects are flushed in ``finally`` blocks
or by ``TPMKey.close()``; the SRK is re-created from its template when needed and flushed right
after, so a bare TPM's three object slots are left to the keys in use. Leaf and init keys live
under a persistent rotating parent instead (``agent.tpm.parents``), which needs no slot at all.

Size: a little over 800 lines, one class per TPM concern would split the command plumbing
(counting, slot swapping, error decoding) every method shares; NV and parent logic already live
in ``nvcounter`` and ``parents``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPMA_SESSION,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_ECC_POINT,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_CONTEXT,
    TPMS_SCHEME_HASH,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TPMU_HA,
    TPMU_SIG_SCHEME,
)

from agent.protocol.attest import Attestation, ek_public_key_from_area, pcr_digest, tpm_name
from agent.protocol.errors import TPMError
from agent.protocol.secret import Secret
from agent.tpm.blob import PARENT_OWNER, TPM2_CC_POLICY_PCR, KeyBlob, pcr_policy
from agent.tpm.templates import (
    KeyKind,
    ek_templates,
    key_template,
    kind_of,
    sealed_template,
    srk_template,
)

# ESYS prints every failing command to stderr; expected failures (a refused unseal) are
# reported as TPMError instead. An operator can still override this in the environment.
os.environ.setdefault("TSS2_LOG", "all+NONE")

EK_RSA_HANDLE = 0x81010001
EK_ECC_HANDLE = 0x81010016
EK_RSA_CERT_NV = 0x01C00002
EK_ECC_CERT_NV = 0x01C00016
PCR_DEBUG = 16
MAX_SEALED_SIZE = 128
_NV_CHUNK = 512

_RC_POLICY_FAIL = 0x09D  # format 1, session number stripped
# INTEGRITY, SIZE, INSUFFICIENT, KEY: TPM2_Load on a private part wrapped by another seed
_RC_FOREIGN_BLOB = (0x09F, 0x095, 0x09A, 0x09C)
_RC_OBJECT_MEMORY = 0x902
_RC_HANDLE = 0x08B  # no object at a persistent handle (format 1, handle number stripped)

EKKind = Literal["rsa", "ecc"]


class ParentEvicted(TPMError):
    """``tpm.parent-evicted``: the key blob's persistent parent is no longer in the TPM (or the
    handle holds a newer parent): the TPM cannot load the key, ever again."""

    check = "tpm.parent-evicted"


def is_persistent(handle: int) -> bool:
    """Whether ``handle`` is in the TPM's persistent object range (0x81000000-0x81FFFFFF)."""
    return 0x81000000 <= handle <= 0x81FFFFFF


class MeasurementsChanged(TPMError):
    """The blob was sealed to other PCR values (PolicyPCR refused it)."""


def _rc_base(rc: int) -> int:
    """A format-1 response code without its handle/parameter/session number (Part 2 §6.6)."""
    return 0x080 | (rc & 0x3F) if rc & 0x80 else rc


def _pcr_selection(pcrs: Iterable[int]) -> TPML_PCR_SELECTION:
    indices = sorted(set(pcrs))
    if not indices or any(not 0 <= i <= 23 for i in indices):
        raise TPMError("pcr-selection", None, f"PCR indices must be in 0..23, got {indices}")
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(i) for i in indices))


class TPMKey(ec.EllipticCurvePrivateKey):
    """A P-256 key loaded in the TPM, usable wherever pyca wants an ``EllipticCurvePrivateKey``:
    ``sign`` runs TPM2_Sign (DER result, like pyca), ``exchange`` runs TPM2_ECDH_ZGen (the x
    coordinate, like pyca). The private key never leaves the TPM, so ``private_numbers`` and
    ``private_bytes`` refuse. ``close()`` flushes the transient object."""

    def __init__(self, store: TPMStore, handle: ESYS_TR, blob: KeyBlob) -> None:
        self._store = store
        # exactly one of _handle (resident) / _saved (swapped out by the store) is set while open
        self._handle: ESYS_TR | None = handle
        self._saved: TPMS_CONTEXT | None = None
        self._closed = False
        self.blob = blob
        public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
        self._area: TPMT_PUBLIC = public.publicArea
        self.kind = kind_of(self._area)
        self.name = tpm_name(blob.public)
        x = bytes(self._area.unique.ecc.x)
        y = bytes(self._area.unique.ecc.y)
        self._public_key = ec.EllipticCurvePublicKey.from_encoded_point(
            ec.SECP256R1(), b"\x04" + x + y
        )

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        else:
            state = "loaded" if self._handle is not None else "swapped out"
        return f"TPMKey(kind={self.kind.value}, name={self.name.hex()[:16]}…, {state})"

    @property
    def public_area(self) -> bytes:
        """The marshalled TPM2B_PUBLIC (what certify/MakeCredential verifiers need)."""
        return self.blob.public

    @property
    def loaded(self) -> bool:
        """True while the key occupies a TPM object slot (not closed, not swapped out)."""
        return self._handle is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Flush the key from the TPM (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._saved = None
        self._store._forget(self)
        handle, self._handle = self._handle, None
        if handle is not None:
            self._store._flush(handle)

    def __enter__(self) -> TPMKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- pyca EllipticCurvePrivateKey -------------------------------------------------------

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        if self.kind is not KeyKind.LEAF:
            raise TPMError("ecdh", None, f"a {self.kind.value} key cannot do ECDH")
        if not isinstance(algorithm, ec.ECDH):
            raise TPMError("ecdh", None, "only ec.ECDH() is supported")
        if not isinstance(peer_public_key.curve, ec.SECP256R1):
            raise TPMError("ecdh", None, f"peer key is on {peer_public_key.curve.name}, not P-256")
        return self._store._ecdh(self, peer_public_key)

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if self.kind is not KeyKind.DEVID:
            raise TPMError("sign", None, f"a {self.kind.value} key does not sign arbitrary data")
        if not isinstance(signature_algorithm, ec.ECDSA) or isinstance(
            signature_algorithm.algorithm, Prehashed
        ):
            raise TPMError("sign", None, "only ec.ECDSA(hashes.SHA256()) is supported")
        if not isinstance(signature_algorithm.algorithm, hashes.SHA256):
            raise TPMError("sign", None, "the key's scheme is ECDSA with SHA-256 only")
        digest = hashes.Hash(hashes.SHA256())
        digest.update(bytes(data))
        return self._store._sign_digest(self, digest.finalize())

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return ec.SECP256R1()

    @property
    def key_size(self) -> int:
        return 256

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TPMError("export", None, "a TPM-resident private key cannot be exported")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise TPMError("export", None, "a TPM-resident private key cannot be exported")

    def __copy__(self) -> TPMKey:
        return self  # one TPM object; a copy would double-flush it

    def __deepcopy__(self, memo: dict[int, object]) -> TPMKey:
        return self


def _measurements_changed(rc: int) -> TPMError:
    return MeasurementsChanged(
        "unseal",
        rc,
        "policy check failed: the PCRs no longer hold the values the data was sealed to",
    )


class TPMStore:
    """One connection to one TPM, chosen by a TCTI string from configuration:
    ``swtpm:host=127.0.0.1,port=2321`` for swtpm, ``device:/dev/tpmrm0`` for a real chip behind
    the kernel resource manager."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self.commands_issued = 0
        self._keys: list[TPMKey] = []  # every open key, resident or swapped out
        self._resident: list[TPMKey] = []  # least recently used first
        self._pinned: list[TPMKey] = []
        try:
            self._esys: ESAPI | None = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise TPMError("connect", int(exc.rc), f"cannot use TCTI '{tcti}': {exc}") from None
        except Exception as exc:  # the TCTI loader raises plain errors for unknown modules
            raise TPMError("connect", None, f"cannot use TCTI '{tcti}': {exc}") from None
        # one round trip now, so a wrong address fails here and not at first use
        try:
            self._call("connect", "get_capability", TPM2_CAP.TPM_PROPERTIES, 0x100, 1)
        except TPMError as exc:
            self.close()
            raise TPMError(
                "connect", exc.rc, f"TCTI '{tcti}' does not answer: {exc.detail}"
            ) from None

    def __repr__(self) -> str:
        return f"TPMStore(tcti={self.tcti!r}, commands_issued={self.commands_issued})"

    def close(self) -> None:
        """Flush every key still open, then drop the connection."""
        try:
            for key in list(self._keys):
                with contextlib.suppress(TPMError):
                    key.close()
        finally:
            esys, self._esys = self._esys, None
            if esys is not None:
                esys.close()

    def __enter__(self) -> TPMStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------

    def _call(self, operation: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Issue one TPM command (ESAPI ``method``), counted; tpm2-pytss errors become
        TPMError. A TPM without a resource manager has about three object slots: when it runs
        out, the least recently used key not needed by the current operation is swapped out
        (ContextSave + FlushContext) and the command is retried."""
        while True:
            try:
                return self._raw_call(operation, method, *args, **kwargs)
            except TPMError as exc:
                if exc.rc != _RC_OBJECT_MEMORY or not self._evict_one():
                    raise

    def _raw_call(self, operation: str, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._esys is None:
            raise TPMError(operation, None, "the TPM store is closed")
        self.commands_issued += 1
        try:
            return getattr(self._esys, method)(*args, **kwargs)
        except TSS2_Exception as exc:
            raise TPMError(operation, int(exc.rc), str(exc)) from None

    def _evict_one(self) -> bool:
        for key in self._resident:
            if key not in self._pinned and key._handle is not None:
                handle = key._handle
                key._saved = self._raw_call("swap-out", "context_save", handle)
                self._raw_call("swap-out", "flush_context", handle)
                key._handle = None
                self._resident.remove(key)
                return True
        return False

    def _forget(self, key: TPMKey) -> None:
        if key in self._resident:
            self._resident.remove(key)
        if key._closed and key in self._keys:
            self._keys.remove(key)

    @contextlib.contextmanager
    def _using(self, *keys: TPMKey) -> Iterator[list[ESYS_TR]]:
        """Make ``keys`` resident (swapping them back in if needed) and keep them from being
        swapped out during the block."""
        for key in keys:
            if key._store is not self:
                raise TPMError("use-key", None, "key belongs to another TPM connection")
            if key._closed:
                raise TPMError("use-key", None, f"{key.kind.value} key was already closed")
        self._pinned.extend(keys)
        try:
            handles: list[ESYS_TR] = []
            for key in keys:
                if key._handle is None:
                    key._handle = self._call("swap-in", "context_load", key._saved)
                    key._saved = None
                self._forget(key)
                self._resident.append(key)
                handles.append(key._handle)
            yield handles
        finally:
            for key in keys:
                self._pinned.remove(key)

    def _flush(self, handle: ESYS_TR) -> None:
        if self._esys is not None:
            self._call("flush", "flush_context", handle)

    @contextlib.contextmanager
    def _transient(self, handle: ESYS_TR) -> Iterator[ESYS_TR]:
        try:
            yield handle
        finally:
            self._flush(handle)

    @contextlib.contextmanager
    def _srk(self) -> Iterator[ESYS_TR]:
        """The SRK, re-created from its template for the duration of a block."""
        handle, *_ = self._call("create-srk", "create_primary", None, srk_template(), ESYS_TR.OWNER)
        with self._transient(handle):
            yield handle

    @contextlib.contextmanager
    def _persistent(self, tpm_handle: int, operation: str) -> Iterator[ESYS_TR]:
        """An ESYS handle for a persistent object or NV index (ReadPublic / NV_ReadPublic)."""
        handle = self._call(operation, "tr_from_tpmpublic", tpm_handle)
        try:
            yield handle
        finally:
            if self._esys is not None:
                self._esys.tr_close(handle)  # local bookkeeping only, no TPM command

    def _name(self, handle: ESYS_TR) -> bytes:
        """The TPM Name ESYS holds for ``handle`` (checked by ReadPublic when it was made; no
        TPM command)."""
        if self._esys is None:
            raise TPMError("name", None, "the TPM store is closed")
        return bytes(self._esys.tr_get_name(handle))

    def transient_handles(self) -> list[int]:
        """Transient object handles currently loaded (for leak checks and diagnostics)."""
        _, data = self._call("get-capability", "get_capability", TPM2_CAP.HANDLES, 0x80000000, 64)
        return [int(h) for h in data.data.handles]

    # --- keys ------------------------------------------------------------------------------

    def create_key(self, kind: KeyKind, parent: int = PARENT_OWNER) -> KeyBlob:
        """Create a key of ``kind`` under the SRK, or under the persistent storage key at
        ``parent`` (a rotating parent, ``agent.tpm.parents``; the blob records its Name too);
        returns its blob (not loaded)."""
        if parent == PARENT_OWNER:
            with self._srk() as srk:
                private, public, *_ = self._call("create", "create", srk, None, key_template(kind))
            return KeyBlob(public=public.marshal(), private=private.marshal())
        with self._persistent(parent, "create") as handle:
            name = self._name(handle)
            private, public, *_ = self._call("create", "create", handle, None, key_template(kind))
        return KeyBlob(public.marshal(), private.marshal(), parent=parent, parent_name=name)

    def load_key(self, blob: KeyBlob) -> TPMKey:
        """Load a key blob under this TPM's SRK or the persistent parent it names. A blob made
        under another TPM's SRK, or damaged, raises TPMError saying so; one whose persistent
        parent was evicted raises ``ParentEvicted``."""
        if blob.sealed:
            raise TPMError("load", None, "blob is sealed data, not a key")
        public, private = self._parse_blob(blob)
        try:
            kind_of(public.publicArea)
        except ValueError as exc:
            raise TPMError("load", None, f"blob holds no keyfleet key: {exc}") from None
        handle = self._load(blob, public, private)
        try:
            key = TPMKey(self, handle, blob)
        except BaseException:
            self._flush(handle)
            raise
        self._keys.append(key)
        self._resident.append(key)
        return key

    def create_and_load(self, kind: KeyKind) -> TPMKey:
        return self.load_key(self.create_key(kind))

    def _parse_blob(self, blob: KeyBlob) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
        if blob.parent != PARENT_OWNER and not is_persistent(blob.parent):
            raise TPMError(
                "load",
                None,
                f"blob parent 0x{blob.parent:08x} is neither the owner SRK 0x40000001 nor a "
                "persistent storage key",
            )
        try:
            public, used_pub = TPM2B_PUBLIC.unmarshal(blob.public)
            private, used_priv = TPM2B_PRIVATE.unmarshal(blob.private)
        except Exception:
            raise TPMError("load", None, "blob's TPM structures do not decode") from None
        if used_pub != len(blob.public) or used_priv != len(blob.private):
            raise TPMError("load", None, "trailing bytes in blob's TPM structures")
        return public, private

    def _load(self, blob: KeyBlob, public: TPM2B_PUBLIC, private: TPM2B_PRIVATE) -> ESYS_TR:
        if blob.parent == PARENT_OWNER:
            with self._srk() as srk:
                return self._load_under(srk, public, private)
        gone = f"its parent 0x{blob.parent:08x} was evicted: the key is destroyed"
        try:
            with self._persistent(blob.parent, "load") as parent:
                name = self._name(parent)
                if blob.parent_name and name != blob.parent_name:
                    raise ParentEvicted("load", None, f"{gone} (the handle holds a newer parent)")
                return self._load_under(parent, public, private)
        except TPMError as exc:
            if exc.rc is not None and _rc_base(exc.rc) == _RC_HANDLE:
                raise ParentEvicted("load", exc.rc, gone) from None
            if exc.rc is not None and _rc_base(exc.rc) in _RC_FOREIGN_BLOB:
                raise TPMError(
                    "load", exc.rc, f"blob is damaged or not from its parent 0x{blob.parent:08x}"
                ) from None
            raise

    def _ecdh(self, key: TPMKey, peer: ec.EllipticCurvePublicKey) -> bytes:
        numbers = peer.public_numbers()
        point = TPM2B_ECC_POINT()
        point.point.x = numbers.x.to_bytes(32, "big")
        point.point.y = numbers.y.to_bytes(32, "big")
        with self._using(key) as (handle,):
            out = self._call("ecdh-zgen", "ecdh_zgen", handle, point)
        # keep ``out`` and ``coordinates`` bound: reading x off a temporary returned garbage
        coordinates = out.point
        x = bytes(coordinates.x)
        if len(x) != 32:
            raise TPMError("ecdh-zgen", None, f"TPM returned a {len(x)}-byte coordinate")
        return x

    def _sign_digest(self, key: TPMKey, digest: bytes) -> bytes:
        scheme = TPMT_SIG_SCHEME(
            scheme=TPM2_ALG.ECDSA,
            details=TPMU_SIG_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
        )
        validation = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with self._using(key) as (handle,):
            signature = self._call("sign", "sign", handle, TPM2B_DIGEST(digest), scheme, validation)
        return bytes(signature)

    # --- PCRs -------------------------------------------------------------------------------

    def pcr_read(self, pcrs: Iterable[int]) -> dict[int, bytes]:
        """Current sha256-bank values of ``pcrs``."""
        wanted = sorted(set(pcrs))
        values: dict[int, bytes] = {}
        while len(values) < len(wanted):
            missing = [i for i in wanted if i not in values]
            _, selection, digests = self._call("pcr-read", "pcr_read", _pcr_selection(missing))
            returned: list[int] = []
            for i in range(selection.count):
                bitmap = bytes(selection.pcrSelections[i].pcrSelect)
                returned.extend(
                    b * 8 + bit
                    for b, byte in enumerate(bitmap)
                    for bit in range(8)
                    if byte >> bit & 1
                )
            if not returned:
                raise TPMError("pcr-read", None, f"TPM returned none of PCRs {missing}")
            for index, digest in zip(sorted(returned), digests, strict=True):
                values[index] = bytes(digest)
        return values

    def pcr_extend(self, pcr: int, digest: bytes) -> None:
        """Extend a sha256 PCR with a 32-byte digest (measured boot)."""
        if len(digest) != 32:
            raise TPMError("pcr-extend", None, f"digest must be 32 bytes, got {len(digest)}")
        if not 0 <= pcr <= 23:
            raise TPMError("pcr-extend", None, f"PCR {pcr} out of range")
        values = TPML_DIGEST_VALUES(
            [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]
        )
        self._call("pcr-extend", "pcr_extend", ESYS_TR.PCR0 + pcr, values)

    def pcr_reset(self, pcr: int = PCR_DEBUG) -> None:
        """Reset a resettable PCR (16, the debug PCR, at locality 0)."""
        self._call("pcr-reset", "pcr_reset", ESYS_TR.PCR0 + pcr)

    # --- sealing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _salted_session(
        self, srk: ESYS_TR, session_type: TPM2_SE, attributes: int
    ) -> Iterator[ESYS_TR]:
        """A session salted by the SRK (its key is unknown to anyone on the bus) with parameter
        encryption as ``attributes`` asks."""
        symmetric = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES)
        symmetric.keyBits.aes = 128
        symmetric.mode.aes = TPM2_ALG.CFB
        session = self._call(
            "start-session",
            "start_auth_session",
            srk,
            ESYS_TR.NONE,
            session_type,
            symmetric,
            TPM2_ALG.SHA256,
        )
        try:
            if self._esys is not None:
                self._esys.trsess_set_attributes(session, attributes)
            yield session
        finally:
            # a successful command without continueSession has already ended the session
            with contextlib.suppress(TPMError):
                self._flush_session(session)

    def _flush_session(self, session: ESYS_TR) -> None:
        if self._esys is None:
            return
        try:
            self._esys.tr_get_tpm_handle(session)
        except TSS2_Exception:
            return  # ESYS already forgot it: the TPM closed it
        self._flush(session)

    @contextlib.contextmanager
    def _trial_session(self) -> Iterator[ESYS_TR]:
        """A trial policy session (flushed after): run the assertions, then ``_trial_digest``."""
        session = self._call(
            "start-trial-session",
            "start_auth_session",
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.TRIAL,
            None,
            TPM2_ALG.SHA256,
        )
        with self._transient(session):
            yield session

    def _trial_digest(self, session: ESYS_TR) -> bytes:
        return bytes(self._call("policy-digest", "policy_get_digest", session))

    def _pcr_policy_digest(self, selection: TPML_PCR_SELECTION) -> bytes:
        with self._trial_session() as session:
            self._call("policy-pcr", "policy_pcr", session, TPM2B_DIGEST(), selection)
            return self._trial_digest(session)

    def _create_sealed(
        self, data: bytes, policy_digest: bytes
    ) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
        """A sealed-data object of 1..128 bytes under the SRK with ``policy_digest`` as its
        authPolicy, the data sent encrypted (salted session, command parameter encryption):
        every seal of this package (PCR, state counter, signed releases) makes it here."""
        if not 0 < len(data) <= MAX_SEALED_SIZE:
            raise TPMError("seal", None, f"sealed data must be 1..{MAX_SEALED_SIZE} bytes")
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=data))
        with (
            self._srk() as srk,
            self._salted_session(
                srk, TPM2_SE.HMAC, TPMA_SESSION.DECRYPT | TPMA_SESSION.CONTINUESESSION
            ) as session,
        ):
            private, public, *_ = self._call(
                "seal", "create", srk, sensitive, sealed_template(policy_digest), session1=session
            )
        return public, private

    def seal(self, secret: Secret | bytes, pcrs: Sequence[int] = (7,)) -> KeyBlob:
        """Seal up to 128 bytes to the current values of ``pcrs`` (sha256 bank). The data is sent
        encrypted (salted session, command parameter encryption)."""
        data = secret.reveal() if isinstance(secret, Secret) else bytes(secret)
        if not 0 < len(data) <= MAX_SEALED_SIZE:
            raise TPMError("seal", None, f"sealed data must be 1..{MAX_SEALED_SIZE} bytes")
        selection = _pcr_selection(pcrs)
        values = self.pcr_read(pcrs)
        public, private = self._create_sealed(data, self._pcr_policy_digest(selection))
        return KeyBlob(
            public=public.marshal(),
            private=private.marshal(),
            parent=PARENT_OWNER,
            sealed=True,
            policy=(pcr_policy(pcr_digest(values, list(values)), selection.marshal()),),
        )

    def unseal(self, blob: KeyBlob) -> Secret:
        """Unseal in a policy session salted by the SRK, with the response encrypted. If the PCRs
        changed since sealing: TPMError rc 0x99d (policy check failed)."""
        if not blob.sealed:
            raise TPMError("unseal", None, "blob is a key, not sealed data")
        if len(blob.policy) != 1 or blob.policy[0].command_code != TPM2_CC_POLICY_PCR:
            raise TPMError("unseal", None, "sealed blob carries no PolicyPCR policy")
        raw = blob.policy[0].command_policy
        digest_size = int.from_bytes(raw[:2], "big")
        try:
            selection, used = TPML_PCR_SELECTION.unmarshal(raw[2 + digest_size :])
        except Exception:
            raise TPMError("unseal", None, "sealed blob's PCR selection does not decode") from None
        if used != len(raw) - 2 - digest_size:
            raise TPMError("unseal", None, "sealed blob's policy has trailing bytes")

        def assertions(session: ESYS_TR) -> None:
            # empty pcrDigest: the TPM compares the live PCRs against the policy at unseal
            self._call("policy-pcr", "policy_pcr", session, TPM2B_DIGEST(), selection)

        return self._unseal_under(blob, assertions)

    def _unseal_under(
        self,
        blob: KeyBlob,
        assertions: Callable[[ESYS_TR], None],
        policy_fail: Callable[[int], TPMError] | None = None,
    ) -> Secret:
        """Load ``blob`` under the SRK and unseal it in a policy session salted by the SRK, with
        the response encrypted, after ``assertions`` ran the policy commands in that session.
        The TPM's final refusal (its policy check failed) is ``policy_fail(rc)``: by default
        ``MeasurementsChanged``, as for a PCR seal (also ``agent.tpm.nvcounter``'s); a caller
        whose policy fails for another reason names it. The one unseal path of the PCR,
        state-counter and release seals."""
        public, private = self._parse_blob(blob)
        with self._srk() as srk:
            obj = self._load_under(srk, public, private)
            with (
                self._transient(obj),
                self._salted_session(
                    srk, TPM2_SE.POLICY, TPMA_SESSION.ENCRYPT | TPMA_SESSION.CONTINUESESSION
                ) as session,
            ):
                assertions(session)
                try:
                    data = self._call("unseal", "unseal", obj, session1=session)
                except TPMError as exc:
                    if exc.rc is not None and _rc_base(exc.rc) == _RC_POLICY_FAIL:
                        raise (policy_fail or _measurements_changed)(exc.rc) from None
                    raise
                return Secret(bytes(data))

    def _load_under(self, srk: ESYS_TR, public: TPM2B_PUBLIC, private: TPM2B_PRIVATE) -> ESYS_TR:
        try:
            handle: ESYS_TR = self._call("load", "load", srk, private, public)
        except TPMError as exc:
            if exc.rc is not None and _rc_base(exc.rc) in _RC_FOREIGN_BLOB:
                raise TPMError(
                    "load",
                    exc.rc,
                    "blob was not made under this TPM's SRK or is damaged "
                    f"(integrity check failed: {exc.detail})",
                ) from None
            if exc.rc == _RC_OBJECT_MEMORY:
                raise TPMError(
                    "load",
                    exc.rc,
                    "no free object slot in the TPM: close keys not in use or use the "
                    "kernel resource manager (/dev/tpmrm0)",
                ) from None
            raise
        return handle

    # --- attestation ------------------------------------------------------------------------

    def quote(self, ak: TPMKey, nonce: bytes, pcrs: Sequence[int]) -> Attestation:
        """TPM2_Quote over ``pcrs`` (sha256) with the AK, qualified by ``nonce``."""
        if ak.kind is not KeyKind.AK:
            raise TPMError("quote", None, f"quotes are signed by the AK, not a {ak.kind.value}")
        selection = _pcr_selection(pcrs)
        with self._using(ak) as (ak_handle,):
            attest, signature = self._call(
                "quote", "quote", ak_handle, selection, nonce, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
            )
        return Attestation(attest=bytes(attest), signature=bytes(signature))

    def certify(self, ak: TPMKey, key: TPMKey, nonce: bytes) -> Attestation:
        """TPM2_Certify: the AK vouches that ``key`` lives in this TPM (with its attributes)."""
        if ak.kind is not KeyKind.AK:
            raise TPMError("certify", None, f"certify is signed by the AK, not a {ak.kind.value}")
        with self._using(key, ak) as (key_handle, ak_handle):
            attest, signature = self._call(
                "certify",
                "certify",
                key_handle,
                ak_handle,
                nonce,
                TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
            )
        return Attestation(attest=bytes(attest), signature=bytes(signature))

    # --- retirement --------------------------------------------------------------------------

    def persistent_handles(self) -> list[int]:
        """Persistent object handles (0x81xxxxxx) present in the TPM."""
        _, data = self._call("get-capability", "get_capability", TPM2_CAP.HANDLES, 0x81000000, 64)
        return [int(h) for h in data.data.handles]

    def flush_transients(self) -> int:
        """Flush every transient object loaded in the TPM (objects a killed process left
        behind; behind a resource manager only this connection's are visible). Returns how many
        were flushed. Keys of this store are closed first."""
        for key in list(self._keys):
            with contextlib.suppress(TPMError):
                key.close()
        flushed = 0
        for value in self.transient_handles():
            # FlushContext also releases the ESYS object, so no tr_close afterwards
            handle = self._call("flush", "tr_from_tpmpublic", value)
            self._call("flush", "flush_context", handle)
            flushed += 1
        return flushed

    def clear(self) -> list[str]:
        """TPM2_Clear with the lockout hierarchy's authorization (empty, as a device that was
        never taken ownership of has it). The storage primary seed changes, so the SRK becomes
        another key and **every blob ever made under the old SRK stops loading on this TPM**:
        the one way to make saved copies of key blobs useless. TPM2_Clear also evicts the
        persistent objects of the storage and endorsement hierarchies, which includes the EKs;
        the endorsement seed does not change, so each EK is re-created from its template (its
        public area with the unique field as the TCG templates have it: zeros of the key size
        for RSA, empty for swtpm's ECC P-384 EK) and persisted again at its handle: the same
        key, so the manufacturer's EK certificate in NV (not cleared) stays valid. Returns one
        note per EK."""
        areas: dict[int, bytes] = {}
        present = set(self.persistent_handles())
        for kind, handle_value in (("rsa", EK_RSA_HANDLE), ("ecc", EK_ECC_HANDLE)):
            if handle_value in present:
                areas[handle_value] = self.ek_public_area(kind)  # type: ignore[arg-type]
        self.flush_transients()
        self._call("clear", "clear", ESYS_TR.LOCKOUT)
        notes = []
        for handle_value, area in areas.items():
            notes.append(self._recreate_ek(handle_value, area))
        return notes

    def _recreate_ek(self, handle_value: int, area: bytes) -> str:
        for template in ek_templates(area):
            handle, public, *_ = self._call(
                "recreate-ek", "create_primary", None, template, ESYS_TR.ENDORSEMENT
            )
            try:
                if public.marshal() == area:
                    self._call("recreate-ek", "evict_control", ESYS_TR.OWNER, handle, handle_value)
                    return f"EK 0x{handle_value:08x} re-created (same key) and persisted"
            finally:
                self._flush(handle)
        return f"EK 0x{handle_value:08x} could not be re-created from its template: it is gone"

    # --- endorsement ------------------------------------------------------------------------

    def ek_public_area(self, kind: EKKind = "rsa") -> bytes:
        """The marshalled TPM2B_PUBLIC of the persistent EK (RSA 2048 at 0x81010001, ECC P-384 at
        0x81010016 as swtpm_setup makes them)."""
        handle_value = EK_RSA_HANDLE if kind == "rsa" else EK_ECC_HANDLE
        with self._persistent(handle_value, "read-ek") as handle:
            public, _, _ = self._call("read-ek", "read_public", handle)
        marshalled: bytes = public.marshal()
        return marshalled

    def ek_public_key(self, kind: EKKind = "rsa") -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        return ek_public_key_from_area(self.ek_public_area(kind))

    def ek_certificate(self, kind: EKKind = "rsa") -> x509.Certificate:
        """The manufacturer's EK certificate from NV (0x01c00002 RSA, 0x01c00016 ECC)."""
        index = EK_RSA_CERT_NV if kind == "rsa" else EK_ECC_CERT_NV
        with self._persistent(index, "read-ek-cert") as nv:
            nv_public, _ = self._call("read-ek-cert", "nv_read_public", nv)
            size = int(nv_public.nvPublic.dataSize)
            data = b""
            while len(data) < size:
                chunk = min(_NV_CHUNK, size - len(data))
                offset = len(data)
                part = self._call("read-ek-cert", "nv_read", nv, chunk, offset)
                data += bytes(part)
        try:
            return x509.load_der_x509_certificate(_der_prefix(data))
        except (ValueError, x509.InvalidVersion):  # a version field outside 1..3 raises the latter
            raise TPMError("read-ek-cert", None, f"NV 0x{index:08x} holds no certificate") from None

    @contextlib.contextmanager
    def _ek_authorization(self, ek: EKKind) -> Iterator[ESYS_TR]:
        """The RSA EK (TCG low-range template) can only be used through its policy,
        PolicySecret(TPM_RH_ENDORSEMENT); swtpm's ECC P-384 EK also allows its (empty) password."""
        if ek == "ecc":
            yield ESYS_TR.PASSWORD
            return
        session = self._call(
            "start-session",
            "start_auth_session",
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            None,
            TPM2_ALG.SHA256,
        )
        try:
            self._call("policy-secret", "policy_secret", ESYS_TR.ENDORSEMENT, session, expiration=0)
            yield session
        finally:
            with contextlib.suppress(TPMError):
                self._flush_session(session)

    def activate_credential(
        self,
        ak: TPMKey,
        credential_blob: bytes,
        encrypted_secret: bytes,
        ek: EKKind = "rsa",
    ) -> Secret:
        """TPM2_ActivateCredential: recover the credential a verifier made for (this TPM's EK,
        this AK's Name). Fails with TPMError if either does not match."""
        try:
            blob, used_blob = TPM2B_ID_OBJECT.unmarshal(credential_blob)
            secret, used_secret = TPM2B_ENCRYPTED_SECRET.unmarshal(encrypted_secret)
        except Exception:
            raise TPMError("activate-credential", None, "credential does not decode") from None
        if used_blob != len(credential_blob) or used_secret != len(encrypted_secret):
            raise TPMError("activate-credential", None, "trailing bytes in credential")
        handle_value = EK_RSA_HANDLE if ek == "rsa" else EK_ECC_HANDLE
        with (
            self._persistent(handle_value, "activate-credential") as ek_handle,
            self._ek_authorization(ek) as ek_session,
            self._using(ak) as (ak_handle,),
        ):
            try:
                cred = self._call(
                    "activate-credential",
                    "activate_credential",
                    ak_handle,
                    ek_handle,
                    blob,
                    secret,
                    session2=ek_session,
                )
            except TPMError as exc:
                raise TPMError(
                    "activate-credential",
                    exc.rc,
                    f"credential was not made for this TPM's EK and this AK ({exc.detail})",
                ) from None
        return Secret(bytes(cred))


def _der_prefix(data: bytes) -> bytes:
    """NV areas may be larger than the DER they hold: cut at the outer SEQUENCE's length."""
    if len(data) < 4 or data[0] != 0x30:
        return data
    first = data[1]
    if first < 0x80:
        return data[: 2 + first]
    count = first & 0x7F
    length = int.from_bytes(data[2 : 2 + count], "big")
    return data[: 2 + count + length]

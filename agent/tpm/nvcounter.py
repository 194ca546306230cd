"""The state counter: a TPM NV counter index, and data sealed so that it unseals only while that
counter holds the value it had at sealing (PolicyPCR + PolicyNV, in that order).

The counter (``TPMA_NV_COUNTER``) only ever grows; once it moves, every blob sealed under an
earlier value is refused by the TPM itself (PolicyNV: ``TPM_RC_POLICY``), whatever the disk
holds. Even undefining and re-defining the index does not bring an old value back: a new counter
index starts at the highest value any counter of the TPM ever had.

The index is defined in the owner hierarchy with the empty owner authorization (the agent's keys
use the same hierarchy and authorization), readable and incrementable with its own empty
authValue, ``NO_DA`` (an unclean shutdown must not count as a failed authorization). Whoever is
root on the device can increment it (and so make the sealed state unusable: a denial of service
root has anyway by deleting files), never decrement it.

A sealed blob records both policy commands in its ``policy`` field (TSS2 PEM ``TPMPolicy``):
PolicyPCR as ``agent.tpm.blob.pcr_policy`` writes it, then PolicyNV as
``nvIndex (4) || operandB (TPM2B) || offset (2) || operation (2)``.

This module drives the TPM through ``TPMStore``'s plumbing (its counted ``_call``, the SRK, salted
sessions): the same package, kept apart because store.py is at its size limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_EO,
    TPM2_NT,
    TPMA_NV,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_NV_PUBLIC,
    TPM2B_OPERAND,
    TPML_PCR_SELECTION,
    TPMS_NV_PUBLIC,
)

from agent.protocol.attest import pcr_digest
from agent.protocol.errors import TPMError
from agent.protocol.secret import Secret
from agent.tpm.blob import PARENT_OWNER, TPM2_CC_POLICY_PCR, KeyBlob, PolicyCommand, pcr_policy
from agent.tpm.store import (
    MAX_SEALED_SIZE,
    TPMStore,
    _pcr_selection,
    _rc_base,
)

# Owner-defined NV range (0x01000000-0x013FFFFF); "KF" in the low bytes.
STATE_COUNTER_INDEX = 0x01004B46
TPM2_CC_POLICY_NV = 0x00000149
_RC_HANDLE = 0x08B  # TPM_RC_HANDLE: no such NV index (format 1, number stripped)
_RC_POLICY = 0x126  # TPM_RC_POLICY: PolicyNV's comparison failed
_RC_NV_DEFINED = 0x14C  # TPM_RC_NV_DEFINED
_COUNTER_ATTRIBUTES = (
    TPMA_NV.OWNERWRITE
    | TPMA_NV.OWNERREAD
    | TPMA_NV.AUTHWRITE
    | TPMA_NV.AUTHREAD
    | TPMA_NV.NO_DA
    | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT)
)


class CounterMoved(TPMError):
    """The blob was sealed under another value of the state counter (PolicyNV refused it)."""


def is_missing(exc: TPMError) -> bool:
    """Whether a TPM error means "no such NV index" (TPM_RC_HANDLE, any handle number)."""
    return exc.rc is not None and _rc_base(exc.rc) == _RC_HANDLE


class NVCounter:
    """One NV counter index of one TPM (through ``store``'s connection)."""

    def __init__(self, store: TPMStore, index: int = STATE_COUNTER_INDEX) -> None:
        if not 0x01000000 <= index <= 0x013FFFFF:
            raise ValueError(f"NV index {index:#x} is outside the owner range")
        self.store = store
        self.index = index

    def __repr__(self) -> str:
        return f"NVCounter({self.index:#010x})"

    def _handle(self) -> ESYS_TR:
        try:
            handle: ESYS_TR = self.store._raw_call("nv-counter", "tr_from_tpmpublic", self.index)
        except TPMError as exc:
            raise TPMError(
                "nv-counter", exc.rc, f"NV index {self.index:#x} is not defined: {exc.detail}"
            ) from None
        return handle

    def exists(self) -> bool:
        try:
            self._handle()
        except TPMError as exc:
            if is_missing(exc):
                return False
            raise
        return True

    def ensure(self) -> bool:
        """Define the counter if this TPM does not have it yet, and write it once (a counter
        cannot be read or used in a policy before its first increment). True if it was made."""
        if self.exists():
            return False
        public = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=self.index,
                nameAlg=TPM2_ALG.SHA256,
                attributes=_COUNTER_ATTRIBUTES,
                dataSize=8,
            )
        )
        try:
            handle = self.store._call(
                "nv-define", "nv_define_space", None, public, auth_handle=ESYS_TR.OWNER
            )
        except TPMError as exc:
            if exc.rc is None or _rc_base(exc.rc) != _RC_NV_DEFINED:
                raise
            handle = self._handle()
        self.store._call("nv-increment", "nv_increment", handle, auth_handle=handle)
        return True

    def read(self) -> int:
        handle = self._handle()
        data = self.store._call("nv-read", "nv_read", handle, 8, 0, auth_handle=handle)
        return int.from_bytes(bytes(data), "big")

    def increment(self) -> int:
        """One NV write: the counter moves by one; every blob sealed under the old value is
        dead from now on. Returns the new value."""
        handle = self._handle()
        self.store._call("nv-increment", "nv_increment", handle, auth_handle=handle)
        return self.read()

    def remove(self) -> None:
        """Undefine the index (factory reset; tests)."""
        handle = self._handle()
        self.store._call("nv-undefine", "nv_undefine_space", handle, auth_handle=ESYS_TR.OWNER)


def _nv_operand(value: int) -> TPM2B_OPERAND:
    return TPM2B_OPERAND(value.to_bytes(8, "big"))


def nv_policy_entry(index: int, value: int) -> PolicyCommand:
    operand = value.to_bytes(8, "big")
    return PolicyCommand(
        TPM2_CC_POLICY_NV,
        index.to_bytes(4, "big")
        + len(operand).to_bytes(2, "big")
        + operand
        + (0).to_bytes(2, "big")
        + int(TPM2_EO.EQ).to_bytes(2, "big"),
    )


def _parse_policy(blob: KeyBlob) -> tuple[TPML_PCR_SELECTION, int, int]:
    """(PCR selection, NV index, counter value) of a counter-bound blob."""
    if (
        len(blob.policy) != 2
        or blob.policy[0].command_code != TPM2_CC_POLICY_PCR
        or blob.policy[1].command_code != TPM2_CC_POLICY_NV
    ):
        raise TPMError("unseal", None, "sealed blob is not bound to the state counter")
    raw = blob.policy[0].command_policy
    digest_size = int.from_bytes(raw[:2], "big")
    try:
        selection, used = TPML_PCR_SELECTION.unmarshal(raw[2 + digest_size :])
    except Exception:
        raise TPMError("unseal", None, "sealed blob's PCR selection does not decode") from None
    if used != len(raw) - 2 - digest_size:
        raise TPMError("unseal", None, "sealed blob's policy has trailing bytes")
    return (selection, *parse_nv_entry(blob.policy[1]))


def parse_nv_entry(entry: PolicyCommand) -> tuple[int, int]:
    """(NV index, counter value) of a recorded ``PolicyNV(counter == value)`` entry."""
    nv = entry.command_policy
    if (
        entry.command_code != TPM2_CC_POLICY_NV
        or len(nv) != 4 + 2 + 8 + 4
        or nv[4:6] != b"\x00\x08"
        or nv[14:] != b"\x00\x00\x00\x00"
    ):
        raise TPMError("unseal", None, "sealed blob's PolicyNV entry is not counter == value")
    return int.from_bytes(nv[:4], "big"), int.from_bytes(nv[6:14], "big")


def bound_counter(blob: KeyBlob) -> int:
    """The counter value a blob was sealed under (from its recorded policy; the TPM enforces
    it, this is for messages and file bookkeeping)."""
    return _parse_policy(blob)[2]


def _policy_digest(
    store: TPMStore, selection: TPML_PCR_SELECTION, nv: ESYS_TR, value: int
) -> bytes:
    with store._trial_session() as session:
        store._call("policy-pcr", "policy_pcr", session, TPM2B_DIGEST(), selection)
        store._call("policy-nv", "policy_nv", nv, nv, session, _nv_operand(value), TPM2_EO.EQ, 0)
        return store._trial_digest(session)


def seal_bound(counter: NVCounter, secret: Secret, pcrs: Sequence[int], value: int) -> KeyBlob:
    """Seal ``secret`` so that it unseals only while the PCRs hold their current values and the
    counter equals ``value`` (which may be the next value: a rotation seals before it commits)."""
    store = counter.store
    data = secret.reveal()
    if not 0 < len(data) <= MAX_SEALED_SIZE:
        raise TPMError("seal", None, f"sealed data must be 1..{MAX_SEALED_SIZE} bytes")
    selection = _pcr_selection(pcrs)
    values = store.pcr_read(pcrs)
    digest = _policy_digest(store, selection, counter._handle(), value)
    public, private = store._create_sealed(data, digest)
    return KeyBlob(
        public=public.marshal(),
        private=private.marshal(),
        parent=PARENT_OWNER,
        sealed=True,
        policy=(
            pcr_policy(pcr_digest(values, list(values)), selection.marshal()),
            nv_policy_entry(counter.index, value),
        ),
    )


def unseal_bound(counter: NVCounter, blob: KeyBlob) -> Secret:
    """Unseal a counter-bound blob. ``CounterMoved`` if the counter is no longer the value it
    was sealed under (the TPM refuses PolicyNV), ``MeasurementsChanged`` if the PCRs moved."""
    if not blob.sealed:
        raise TPMError("unseal", None, "blob is a key, not sealed data")
    selection, index, value = _parse_policy(blob)
    if index != counter.index:
        raise TPMError("unseal", None, f"blob is bound to NV index {index:#x}, not this counter")
    store = counter.store
    nv = counter._handle()

    def assertions(session: ESYS_TR) -> None:
        store._call("policy-pcr", "policy_pcr", session, TPM2B_DIGEST(), selection)
        policy_nv(store, nv, session, value)

    return store._unseal_under(blob, assertions)


def policy_nv(store: TPMStore, nv: ESYS_TR, session: ESYS_TR, value: int) -> None:
    """PolicyNV(counter == value) in a policy session; ``CounterMoved`` if the TPM refuses."""
    try:
        store._call("policy-nv", "policy_nv", nv, nv, session, _nv_operand(value), TPM2_EO.EQ, 0)
    except TPMError as exc:
        if exc.rc is not None and _rc_base(exc.rc) == _RC_POLICY:
            raise CounterMoved(
                "unseal",
                exc.rc,
                f"the TPM refuses: sealed under state counter {value}, which has moved",
            ) from None
        raise

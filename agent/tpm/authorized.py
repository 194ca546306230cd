"""The state key sealed for signed releases: PolicyAuthorize by the fleet's release key, then the
state counter (PolicyNV, ``agent.tpm.nvcounter``).

authPolicy = PolicyAuthorize(keyName = Name of the release key, policyRef = ref(g)) followed by
PolicyNV(state counter == value). The blob names no PCR value at all: it opens on any firmware
whose PCR policy the release key signed for generation ``g`` (a ``ReleaseEntry`` of the fleet's
release bundle, ``agent.protocol.release``). At unseal the agent runs, in one policy session:

1. PolicyPCR(selection of the entry), with the live PCRs: the session digest becomes the entry's
   ``approved`` only if the live PCRs are the release's;
2. PolicyAuthorize(approved, ref(g), keyName, ticket), where the ticket comes from
   TPM2_VerifySignature of the entry's signature over SHA-256(approved || ref(g)) by the release
   key's public area loaded with TPM2_LoadExternal;
3. PolicyNV(counter == value): the rollback protection of the state counter, unchanged;
4. Unseal.

The release key is loaded into the **owner** hierarchy, not the NULL one: TPM2_VerifySignature
with a key of the NULL hierarchy returns a NULL ticket, which PolicyAuthorize refuses outside a
trial session. Only the public part is loaded (no authorization is needed for that) and it is
flushed right after the signature is checked: the ticket stays valid without it.

Before the TPM is asked, the agent checks what it can in software, so that a refusal has a
precise cause: the blob's generation (``release.stale`` for a policy of an older generation),
the entry's signature (``release.signature``) and the live PCRs against the entry
(``MeasurementsChanged``). Each check is also enforced by the TPM itself.

The blob's ``policy`` field records both commands: PolicyAuthorize as
``TPM2B(release key TPMT_PUBLIC) || TPM2B(policyRef)``, then PolicyNV as nvcounter writes it.

Apps' secrets (``agent.appseal``) are sealed the same way under a counter of their own, which
moves only when the release generation does.

Like nvcounter, this module drives the TPM through ``TPMStore``'s plumbing.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_ST
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_ECC_PARAMETER,
    TPM2B_NAME,
    TPM2B_NONCE,
    TPM2B_PUBLIC,
    TPMS_SIGNATURE_ECC,
    TPMT_PUBLIC,
    TPMT_SIGNATURE,
    TPMT_TK_VERIFIED,
    TPMU_SIGNATURE,
)

from agent.protocol.errors import TPMError
from agent.protocol.release import (
    REF_LABEL,
    TPM_CC_POLICY_AUTHORIZE,
    ReleaseEntry,
    authorize_digest,
    key_name,
    policy_pcr,
    policy_ref,
    release_key_public_area,
)
from agent.protocol.secret import Secret
from agent.tpm.blob import PARENT_OWNER, KeyBlob, PolicyCommand
from agent.tpm.nvcounter import NVCounter, nv_policy_entry, parse_nv_entry, policy_nv
from agent.tpm.store import MAX_SEALED_SIZE, MeasurementsChanged, _pcr_selection, _rc_base

_RC_SIGNATURE = 0x09B  # TPM_RC_SIGNATURE: the signature is not valid for the key
# TPM_RC_VALUE of PolicyAuthorize's parameter 1: approvedPolicy is not the session digest
_RC_APPROVED_MISMATCH = 0x084 | 0x040 | 0x100


class ReleaseSignatureRefused(TPMError):
    """``release.signature``: TPM2_VerifySignature refused the entry's signature (it was not
    made by the release key this blob is sealed for)."""

    check = "release.signature"


class ReleaseStale(TPMError):
    """``release.stale``: the entry is of another release generation than the blob (an old
    policy replayed), or the TPM refused the authorized policy as not the blob's."""

    check = "release.stale"


def _parse(blob: KeyBlob) -> tuple[bytes, int, int, int]:
    """(release key TPMT_PUBLIC, generation, NV index, counter value) of an authorized blob."""
    if len(blob.policy) != 2 or blob.policy[0].command_code != TPM_CC_POLICY_AUTHORIZE:
        raise TPMError("unseal", None, "sealed blob is not bound to a release key")
    raw = blob.policy[0].command_policy
    area_size = int.from_bytes(raw[:2], "big")
    area = raw[2 : 2 + area_size]
    rest = raw[2 + area_size :]
    ref_size = int.from_bytes(rest[:2], "big")
    ref = rest[2:]
    if (
        len(area) != area_size
        or len(rest) < 2
        or len(ref) != ref_size
        or len(ref) != len(REF_LABEL) + 8
        or not ref.startswith(REF_LABEL)
    ):
        raise TPMError("unseal", None, "sealed blob's PolicyAuthorize entry does not decode")
    index, value = parse_nv_entry(blob.policy[1])
    return area, int.from_bytes(ref[len(REF_LABEL) :], "big"), index, value


def is_authorized(blob: KeyBlob) -> bool:
    """Whether ``blob`` is sealed the release-authorized way (by its recorded policy)."""
    return bool(blob.policy) and blob.policy[0].command_code == TPM_CC_POLICY_AUTHORIZE


def bound_generation(blob: KeyBlob) -> int:
    """The release generation a blob is sealed under (its recorded policyRef)."""
    return _parse(blob)[1]


def bound_counter(blob: KeyBlob) -> int:
    """The state counter value an authorized blob is sealed under."""
    return _parse(blob)[3]


def _authorize_entry(area: bytes, generation: int) -> PolicyCommand:
    ref = policy_ref(generation)
    return PolicyCommand(
        TPM_CC_POLICY_AUTHORIZE,
        len(area).to_bytes(2, "big") + area + len(ref).to_bytes(2, "big") + ref,
    )


def _null_ticket() -> TPMT_TK_VERIFIED:
    return TPMT_TK_VERIFIED(tag=TPM2_ST.VERIFIED, hierarchy=TPM2_RH.NULL)


def seal_authorized(
    counter: NVCounter,
    secret: Secret,
    value: int,
    release_key: ec.EllipticCurvePublicKey,
    generation: int,
) -> KeyBlob:
    """Seal ``secret`` so that it unseals under any PCR policy the release key signed for
    ``generation``, while the state counter equals ``value`` (which may be the next value: a
    rotation seals before it commits). No PCR is read: the seal does not depend on the firmware
    running now."""
    store = counter.store
    data = secret.reveal()
    if not 0 < len(data) <= MAX_SEALED_SIZE:
        raise TPMError("seal", None, f"sealed data must be 1..{MAX_SEALED_SIZE} bytes")
    if generation < 0 or value < 0:
        raise TPMError("seal", None, "generation and counter value must not be negative")
    nv = counter._handle()
    # a trial session skips PolicyAuthorize's checks: an empty approved policy and a NULL
    # ticket give the digest the real session reaches with a signed policy
    with store._trial_session() as trial:
        store._call(
            "policy-authorize",
            "policy_authorize",
            trial,
            TPM2B_DIGEST(),
            TPM2B_NAME(key_name(release_key)),
            _null_ticket(),
            TPM2B_NONCE(policy_ref(generation)),
        )
        policy_nv(store, nv, trial, value)
        digest = store._trial_digest(trial)
    public, private = store._create_sealed(data, digest)
    return KeyBlob(
        public=public.marshal(),
        private=private.marshal(),
        parent=PARENT_OWNER,
        sealed=True,
        policy=(
            _authorize_entry(release_key_public_area(release_key), generation),
            nv_policy_entry(counter.index, value),
        ),
    )


def unseal_authorized(
    counter: NVCounter,
    blob: KeyBlob,
    entry: ReleaseEntry,
    release_key: ec.EllipticCurvePublicKey,
    generation: int,
) -> Secret:
    """Unseal an authorized blob with ``entry`` (of a bundle of ``generation``). Checked in
    software first, then by the TPM: ``ReleaseStale`` (another generation),
    ``ProtocolError`` ``release.policy``/``release.signature`` (the agent's check),
    ``ReleaseSignatureRefused`` (``release.signature``, the TPM's),
    ``MeasurementsChanged`` (the live PCRs are not the entry's), ``CounterMoved``."""
    if not blob.sealed:
        raise TPMError("unseal", None, "blob is a key, not sealed data")
    area, bound, index, _ = _parse(blob)
    if area != release_key_public_area(release_key):
        raise TPMError("unseal", None, "blob is sealed for another release key")
    if index != counter.index:
        raise TPMError("unseal", None, f"blob is bound to NV index {index:#x}, not this counter")
    if generation != bound:
        older = "an older" if generation < bound else "a newer"
        raise ReleaseStale(
            "unseal",
            None,
            f"release {entry.version} is signed for generation {generation}, {older} one than "
            f"the sealed blob's ({bound})",
        )
    entry.check(release_key, generation)  # release.policy, release.signature
    live = counter.store.pcr_read(entry.pcrs)
    if policy_pcr(entry.pcrs, live) != entry.approved:
        raise MeasurementsChanged(
            "unseal", None, f"the live PCRs {list(entry.pcrs)} are not release {entry.version}'s"
        )
    return tpm_unseal(counter, blob, entry, release_key, generation)


def _signature(sig: bytes) -> TPMT_SIGNATURE:
    ecc = TPMS_SIGNATURE_ECC(
        hash=TPM2_ALG.SHA256,
        signatureR=TPM2B_ECC_PARAMETER(sig[:32]),
        signatureS=TPM2B_ECC_PARAMETER(sig[32:]),
    )
    return TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA, signature=TPMU_SIGNATURE(ecdsa=ecc))


def _verify_in_tpm(
    counter: NVCounter, entry: ReleaseEntry, area: bytes, generation: int
) -> tuple[bytes, TPMT_TK_VERIFIED]:
    """LoadExternal (owner hierarchy, public only) + VerifySignature: (key Name, ticket)."""
    store = counter.store
    public_area, used = TPMT_PUBLIC.unmarshal(area)
    if used != len(area):
        raise TPMError("load-external", None, "release key public area has trailing bytes")
    handle = store._call(
        "load-external", "load_external", TPM2B_PUBLIC(publicArea=public_area), None, ESYS_TR.OWNER
    )
    with store._transient(handle):
        name = store._name(handle)
        try:
            ticket = store._call(
                "verify-signature",
                "verify_signature",
                handle,
                TPM2B_DIGEST(authorize_digest(entry.approved, generation)),
                _signature(entry.sig),
            )
        except TPMError as exc:
            if exc.rc is not None and _rc_base(exc.rc) == _RC_SIGNATURE:
                raise ReleaseSignatureRefused(
                    "verify-signature",
                    exc.rc,
                    f"the TPM refuses release {entry.version}'s signature: not the release key's",
                ) from None
            raise
    return name, ticket


def tpm_unseal(
    counter: NVCounter,
    blob: KeyBlob,
    entry: ReleaseEntry,
    release_key: ec.EllipticCurvePublicKey,
    generation: int,
) -> Secret:
    """The TPM part of ``unseal_authorized`` alone, without the agent's software checks (so
    tests can show the TPM's own refusals)."""
    store = counter.store
    nv = counter._handle()
    _, _, _, value = _parse(blob)
    name, ticket = _verify_in_tpm(counter, entry, release_key_public_area(release_key), generation)

    def assertions(session: ESYS_TR) -> None:
        store._call("policy-pcr", "policy_pcr", session, TPM2B_DIGEST(), _pcr_selection(entry.pcrs))
        try:
            store._call(
                "policy-authorize",
                "policy_authorize",
                session,
                TPM2B_DIGEST(entry.approved),
                TPM2B_NAME(name),
                ticket,
                TPM2B_NONCE(policy_ref(generation)),
            )
        except TPMError as exc:
            if exc.rc == _RC_APPROVED_MISMATCH:
                raise MeasurementsChanged(
                    "unseal",
                    exc.rc,
                    f"the TPM refuses: the live PCRs are not release {entry.version}'s",
                ) from None
            raise
        policy_nv(store, nv, session, value)

    def stale(rc: int) -> TPMError:
        return ReleaseStale(
            "unseal",
            rc,
            "the TPM refuses: the authorized policy is not the one the blob is sealed "
            "for (another release generation or release key)",
        )

    return store._unseal_under(blob, assertions, stale)

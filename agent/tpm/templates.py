"""Key templates, each built fresh by a function (tpm2-pytss objects are mutable; a shared global
template could be changed by one caller under another's feet)."""

from __future__ import annotations

import enum

from tpm2_pytss.constants import TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_DIGEST, TPM2B_PUBLIC, TPMT_PUBLIC

_FIXED = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
# Identity keys have an empty authValue, so dictionary-attack protection guards nothing for them;
# without NODA, every unclean TPM shutdown (power loss, a killed swtpm) counts as a failed
# authorization, and a device that loses power a few times locks itself out (rc 0x921).
_AUTH = TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA


class KeyKind(enum.Enum):
    """What a TPM key is for; each kind has exactly one template."""

    DEVID = "devid"  # ECC P-256 ECDSA-SHA256: signs every message the device sends
    AK = "ak"  # restricted ECC P-256 signing: quotes, certifies the DevID
    LEAF = "leaf"  # ECC P-256 ECDH (decrypt): the device's leaf in a group's ratchet tree


def srk_template() -> TPM2B_PUBLIC:
    """The storage root key: ECC P-256 primary, owner hierarchy, restricted decrypt,
    AES-128-CFB. Deterministic from the owner seed, so re-creating it gives the same key."""
    return TPM2B_PUBLIC.parse(
        "ecc256:aes128cfb",
        objectAttributes=TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | _FIXED | _AUTH,
    )


def parent_template(unique: bytes) -> TPM2B_PUBLIC:
    """A rotating parent (``agent.tpm.parents``): the SRK's template with a random ``unique``
    (32 bytes, the x coordinate field), so the primary it makes is derived from the owner seed
    *and* that value: not stored anywhere, once the persistent key is evicted nobody can make it
    again."""
    if len(unique) != 32:
        raise ValueError("a parent's unique value is 32 bytes")
    public = srk_template()
    public.publicArea.unique.ecc.x = unique
    return public


def key_template(kind: KeyKind) -> TPM2B_PUBLIC:
    if kind is KeyKind.DEVID:
        return TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256", objectAttributes=TPMA_OBJECT.SIGN_ENCRYPT | _FIXED | _AUTH
        )
    if kind is KeyKind.AK:
        # a restricted signing key must leave the scheme in the symmetric slot NULL (":null"),
        # otherwise TPM2_Create answers 0x2d6
        return TPM2B_PUBLIC.parse(
            "ecc256:ecdsa-sha256:null",
            objectAttributes=TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | _FIXED | _AUTH,
        )
    if kind is KeyKind.LEAF:
        return TPM2B_PUBLIC.parse(
            "ecc256:ecdh-sha256", objectAttributes=TPMA_OBJECT.DECRYPT | _FIXED | _AUTH
        )
    raise ValueError(f"unknown key kind {kind}")


def sealed_template(policy_digest: bytes) -> TPM2B_PUBLIC:
    """A keyed-hash data object whose only authorization is ``policy_digest`` (no USERWITHAUTH:
    the empty password must not unseal it)."""
    public = TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA,
        authPolicy=TPM2B_DIGEST(policy_digest),
    )
    public.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(publicArea=public)


def kind_of(public: TPMT_PUBLIC) -> KeyKind:
    """Which kind a loaded public area is, from its attributes and scheme."""
    attrs = int(public.objectAttributes)
    if public.type != TPM2_ALG.ECC:
        raise ValueError("not an ECC key")
    if attrs & TPMA_OBJECT.RESTRICTED and attrs & TPMA_OBJECT.SIGN_ENCRYPT:
        return KeyKind.AK
    if attrs & TPMA_OBJECT.SIGN_ENCRYPT:
        return KeyKind.DEVID
    if attrs & TPMA_OBJECT.DECRYPT and not attrs & TPMA_OBJECT.RESTRICTED:
        return KeyKind.LEAF
    raise ValueError("ECC key of no keyfleet kind")


def ek_templates(area: bytes) -> list[TPM2B_PUBLIC]:
    """Candidate creation templates for an EK whose public area is ``area``: the same area with
    the unique field zero-filled to the key size, or empty (TCG EK profile templates use one or
    the other). Whichever re-creates exactly ``area`` is the template it was made from."""
    candidates = []
    for empty in (False, True):
        public, _ = TPM2B_PUBLIC.unmarshal(area)
        unique = public.publicArea.unique
        if public.publicArea.type == TPM2_ALG.RSA:
            unique.rsa = b"" if empty else bytes(len(bytes(unique.rsa)))
        else:
            size = len(bytes(unique.ecc.x))
            unique.ecc.x = b"" if empty else bytes(size)
            unique.ecc.y = b"" if empty else bytes(size)
        candidates.append(public)
    return candidates

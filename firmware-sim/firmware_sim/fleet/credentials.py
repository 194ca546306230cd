"""The virtual devices' TPM-residency proofs, SIMULATED: a software "AK" per virtual device.

A real device proves that a group leaf key lives in its TPM with a TPM2_Certify of the key by its
enrolled AK (``agent.daemon.TpmKeys.prove_leaf``), and its DevID certificate names that AK by
its TPM Name. A virtual device has no TPM, so this module plays the TPM's part: it keeps a
software P-256 key as the "AK", describes it with the AK template's public area (so it has a TPM
Name the DevID certificate can carry), and builds the TPMS_ATTEST of a certify by hand, the way
a TPM would, with the leaf key described by the leaf template (fixedTPM, fixedParent,
sensitiveDataOrigin, decrypt). INSECURE, simulation only: nothing of that is true of a software
key. The proof has exactly the structure ``agent.protocol.credentials.verify_tpm_residency``
checks, so the members of a virtual fleet accept each other the way real devices do.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPM2_ST
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_NAME,
    TPM2B_PUBLIC,
    TPMS_ATTEST,
    TPMS_CERTIFY_INFO,
    TPMS_CLOCK_INFO,
    TPMU_ATTEST,
)

from agent.protocol.attest import TPM_GENERATED_VALUE, Attestation, tpm_name
from agent.protocol.credentials import leaf_qualifying_data, tpm_proof_from_certify
from agent.tpm.templates import KeyKind, key_template
from provisioning import pki

SIMULATED_AK_FILE = "ak.key"
"""Where a virtual device keeps its software "AK" (PEM), beside its DevID key."""


def simulated_public_area(kind: KeyKind, public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The marshalled TPM2B_PUBLIC a TPM would report for a key of ``kind`` with this point."""
    point = public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    template: TPM2B_PUBLIC = key_template(kind)
    template.publicArea.unique.ecc.x = point[1:33]
    template.publicArea.unique.ecc.y = point[33:]
    return bytes(template.marshal())


class SimulatedAK:
    """A virtual device's software "AK" (INSECURE, simulation only)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        self.public_area = simulated_public_area(KeyKind.AK, key.public_key())
        self.name = tpm_name(self.public_area)

    def __repr__(self) -> str:
        return f"SimulatedAK(name={self.name.hex()[:16]}…)"

    @classmethod
    def generate(cls) -> SimulatedAK:
        return cls(pki.generate_key())

    @classmethod
    def load(cls, path: Path) -> SimulatedAK:
        return cls(pki.key_from_pem(path.read_bytes()))

    def save(self, path: Path) -> None:
        pki.write_private_key(path, self._key)

    def certify(self, leaf_public: bytes, qualifying_data: bytes) -> Attestation:
        """What TPM2_Certify of ``leaf_public`` (TPM2B_PUBLIC) by this AK would return: the
        TPMS_ATTEST (clock and firmware fields zero: there is no TPM to read them from) and the
        AK's DER ECDSA-SHA256 signature over it."""
        leaf_name = tpm_name(leaf_public)
        attest = TPMS_ATTEST(
            magic=TPM_GENERATED_VALUE,
            type=TPM2_ST.ATTEST_CERTIFY,
            qualifiedSigner=TPM2B_NAME(self.name),
            extraData=TPM2B_DATA(qualifying_data),
            clockInfo=TPMS_CLOCK_INFO(clock=0, resetCount=0, restartCount=0, safe=1),
            firmwareVersion=0,
            attested=TPMU_ATTEST(
                certify=TPMS_CERTIFY_INFO(
                    name=TPM2B_NAME(leaf_name), qualifiedName=TPM2B_NAME(leaf_name)
                )
            ),
        )
        data = bytes(attest.marshal())
        return Attestation(attest=data, signature=self._key.sign(data, ec.ECDSA(hashes.SHA256())))

    def prove_leaf(self, leaf_public_key: ec.EllipticCurvePublicKey) -> bytes:
        """The residency proof of a software leaf key, as ``TpmKeys.prove_leaf`` makes it on a
        TPM (simulated: the leaf is described as a TPM leaf key, which it is not)."""
        leaf_public = simulated_public_area(KeyKind.LEAF, leaf_public_key)
        point = leaf_public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        attestation = self.certify(leaf_public, leaf_qualifying_data(point))
        return tpm_proof_from_certify(self.public_area, leaf_public, attestation)

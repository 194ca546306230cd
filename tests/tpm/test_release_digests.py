"""The software policy digests and key name of agent.protocol.release agree with a real TPM
(swtpm): a trial PolicyPCR session, TPM2_LoadExternal's name for the release key, and a trial
PolicyAuthorize."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import ESYS_TR, TPM2_RH
from tpm2_pytss.types import TPM2B_DIGEST, TPM2B_NONCE, TPM2B_PUBLIC, TPMT_PUBLIC, TPMT_TK_VERIFIED

from agent.protocol import release as rel
from agent.tpm import TPMStore
from agent.tpm.store import _pcr_selection
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.tpm


def test_policy_pcr_digest_matches_the_tpm(swtpm: Swtpm) -> None:
    pcrs = (0, 1, 4, 9)
    with TPMStore(swtpm.tcti) as store:
        store.pcr_extend(4, hashlib.sha256(b"kernel 1.1").digest())
        live = store.pcr_read(pcrs)
        assert store._pcr_policy_digest(_pcr_selection(pcrs)) == rel.policy_pcr(pcrs, live)
        assert bytes(_pcr_selection(pcrs).marshal()) == rel.pcr_selection(pcrs)


def test_release_key_name_and_policy_authorize_match_the_tpm(swtpm: Swtpm) -> None:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    area, used = TPMT_PUBLIC.unmarshal(rel.release_key_public_area(public))
    assert used == len(rel.release_key_public_area(public))
    ref = rel.policy_ref(7)
    with TPMStore(swtpm.tcti) as store:
        handle = store._call(
            "load-external", "load_external", TPM2B_PUBLIC(publicArea=area), None, ESYS_TR.RH_OWNER
        )
        with store._transient(handle):
            name = store._name(handle)
            assert name == rel.key_name(public)
            with store._trial_session() as session:
                store._call(
                    "policy-authorize",
                    "policy_authorize",
                    session,
                    TPM2B_DIGEST(),
                    name,
                    TPMT_TK_VERIFIED(tag=0x8022, hierarchy=TPM2_RH.NULL),
                    TPM2B_NONCE(ref),
                )
                assert store._trial_digest(session) == rel.policy_authorize(name, ref)

"""A message signed by a DevID key inside a real swtpm verifies like one signed in software:
COSE signing only calls ``sign()``, and the TPM's DER signature becomes COSE's raw r || s."""

from __future__ import annotations

import pytest

from agent.protocol.wire import cose
from agent.protocol.wire.envelope import Signer, encode_message, open_message
from agent.protocol.wire.messages.operator import Rekey
from agent.tpm import KeyKind, TPMStore
from tests.fixtures.swtpm import Swtpm

pytestmark = pytest.mark.tpm

NOW = 1_700_000_000


def test_tpm_devid_signs_envelopes(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.DEVID) as devid:
        public = devid.public_key()
        body = Rekey(command_id=bytes(16), group_id="g1")
        data = encode_message(body, key=devid, sender="dev-1", to="service", seq=1, time=NOW)

        def resolver(kid: bytes) -> Signer:
            if kid != cose.key_id(public):
                raise KeyError(kid)
            return Signer("dev-1", public)

        message = open_message(data, resolver, now=NOW, recipients={"service"})
        assert message.body == body
        assert message.kid == cose.key_id(public)
        assert len(cose.decode_sign1(data).signature) == 64

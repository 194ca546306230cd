"""agent.protocol.tpmquote on real swtpm quotes: each decodes to the fields tpm2-pytss decodes,
and thousands of mutations of each (bytes flipped, cut off, appended, inserted) get the same
verdict from both (tests/pure/test_tpm_quote_parse.py: the property and its one exception)."""

from __future__ import annotations

import os
import random

import pytest

from agent.protocol.tpmquote import parse_quote
from agent.tpm import KeyKind, TPMStore
from tests.fixtures.swtpm import Swtpm
from tests.pure.test_tpm_quote_parse import assert_same, decoded, reference

pytestmark = pytest.mark.tpm

SELECTIONS = [(0,), (0, 1, 2, 3, 7, 16), (7, 8, 9, 10, 11, 12, 13, 14, 15), tuple(range(24))]


def test_real_quotes_and_their_mutations_decode_as_tpm2_pytss_decodes_them(swtpm: Swtpm) -> None:
    with TPMStore(swtpm.tcti) as store, store.create_and_load(KeyKind.AK) as ak:
        quotes = [
            (nonce, store.quote(ak, nonce, pcrs).attest)
            for pcrs in SELECTIONS
            for nonce in (os.urandom(32), os.urandom(16), b"")
        ]
    rng = random.Random(20)
    for nonce, attest in quotes:
        assert decoded(attest) == reference(attest)
        assert decoded(attest)[0] == "ok"
        assert parse_quote(attest).extra_data == nonce
        for _ in range(1_500):
            mutated = bytearray(attest)
            edit = rng.choice(["flip", "cut", "extend", "insert", "delete"])
            at = rng.randrange(len(mutated))
            if edit == "flip":
                mutated[at] = rng.randrange(256)
            elif edit == "cut":
                del mutated[at:]
            elif edit == "extend":
                mutated += rng.randbytes(rng.randint(1, 8))
            elif edit == "insert":
                mutated[at:at] = rng.randbytes(rng.randint(1, 4))
            else:
                del mutated[at : at + rng.randint(1, 4)]
            assert_same(bytes(mutated))

"""RFC 9420 key-schedule vector for cipher suite 2 through agent.protocol.mls.key_schedule
(tests/vectors/README.md has the provenance): every epoch of the shipped chain."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import hpke
from agent.protocol.mls import crypto
from agent.protocol.mls.key_schedule import (
    EpochSecrets,
    derive_epoch,
    epoch_from_joiner,
    group_context_bytes,
    mls_exporter,
    welcome_key_nonce,
)

pytestmark = pytest.mark.pure

VECTOR: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "vectors" / "mls-key-schedule-cs2.json").read_text()
)[0]
SECRET_FIELDS = [f.name for f in dataclasses.fields(EpochSecrets)]
# The published format carries every secret except the intermediate epoch_secret.
VECTOR_FIELDS = [name for name in SECRET_FIELDS if name != "epoch_secret"]


def _h(value: str) -> bytes:
    return bytes.fromhex(value)


def test_vector_is_suite_2_with_epochs() -> None:
    assert VECTOR["cipher_suite"] == 2
    assert len(VECTOR["epochs"]) >= 2


def test_every_epoch_of_the_chain() -> None:
    group_id = _h(VECTOR["group_id"])
    init_secret = _h(VECTOR["initial_init_secret"])
    for index, epoch in enumerate(VECTOR["epochs"]):
        context = group_context_bytes(
            group_id, index, _h(epoch["tree_hash"]), _h(epoch["confirmed_transcript_hash"])
        )
        assert context == _h(epoch["group_context"]), f"epoch {index}"
        secrets = derive_epoch(
            init_secret, _h(epoch["commit_secret"]), context, _h(epoch["psk_secret"])
        )
        for name in VECTOR_FIELDS:
            assert getattr(secrets, name) == _h(epoch[name]), f"epoch {index} {name}"
        external = crypto.derive_key_pair(secrets.external_secret)
        assert hpke.serialize_public_key(external.public_key()) == _h(epoch["external_pub"])
        exporter = epoch["exporter"]
        # The one exception to "hex strings are bytes": the generators (and openmls) use the
        # exporter label as a string, so the label bytes are the hex text itself.
        out = mls_exporter(
            secrets.exporter_secret,
            exporter["label"].encode(),
            _h(exporter["context"]),
            exporter["length"],
        )
        assert out == _h(exporter["secret"]), f"epoch {index} exporter"
        assert epoch_from_joiner(secrets.joiner_secret, context, _h(epoch["psk_secret"])) == (
            secrets
        )
        init_secret = secrets.init_secret


def test_default_psk_secret_is_zeros_and_matters() -> None:
    epoch = VECTOR["epochs"][0]
    context = _h(epoch["group_context"])
    base = (_h(VECTOR["initial_init_secret"]), _h(epoch["commit_secret"]), context)
    assert derive_epoch(*base) == derive_epoch(*base, bytes(32))
    assert derive_epoch(*base).joiner_secret == _h(epoch["joiner_secret"])
    assert derive_epoch(*base).welcome_secret != _h(epoch["welcome_secret"])


def test_group_context_with_extensions_is_length_prefixed() -> None:
    plain = group_context_bytes(b"g", 1, b"t", b"c")
    with_ext = group_context_bytes(b"g", 1, b"t", b"c", b"\x00\x01\x00")
    assert plain.endswith(b"\x00")
    assert with_ext == plain[:-1] + b"\x03\x00\x01\x00"


def test_welcome_key_and_nonce() -> None:
    key, nonce = welcome_key_nonce(_h(VECTOR["epochs"][0]["welcome_secret"]))
    assert (len(key), len(nonce)) == (16, 12)
    other_key, other_nonce = welcome_key_nonce(_h(VECTOR["epochs"][1]["welcome_secret"]))
    assert key != other_key and nonce != other_nonce


def test_secrets_never_in_repr() -> None:
    epoch = VECTOR["epochs"][0]
    secrets = epoch_from_joiner(_h(epoch["joiner_secret"]), _h(epoch["group_context"]))
    text = repr(secrets)
    for name in SECRET_FIELDS:
        assert getattr(secrets, name).hex() not in text
        assert repr(getattr(secrets, name))[:20] not in text

"""``keyfleet keys rotate broker-ca|operator-ca``: what their parsers give ``ca_proposal``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from agent.protocol.errors import ConfigError
from agent.protocol.wire.messages.operator import ROTATE_BROKER_CA, ROTATE_OPERATOR_CA
from provisioning import cli, pki, trust_cli

pytestmark = pytest.mark.pure


@pytest.mark.parametrize(
    ("target", "what", "rotate"),
    [
        ("broker-ca", "broker CA", ROTATE_BROKER_CA),
        ("operator-ca", "operator CA", ROTATE_OPERATOR_CA),
    ],
)
def test_an_unkeyed_ca_rotation_parses_into_a_proposal_without_a_key(
    tmp_path: Path, target: str, what: str, rotate: str
) -> None:
    ca = pki.create_ca("acme CA 2", now=datetime.now(UTC), valid_for=timedelta(days=30))
    cert_file = tmp_path / "ca.pem"
    pki.write_certificate(cert_file, ca.certificate)
    parser = cli.build_parser()
    args = parser.parse_args(["keys", "rotate", target, "--new-ca", str(cert_file)])
    assert args.overlap == trust_cli.DEFAULT_OVERLAP and not hasattr(args, "new_key")
    label, body = trust_cli.proposal(args, bytes(16))
    assert label.startswith(f"rotate the {what} to CN=acme CA 2")
    assert (body.rotate, body.key_ref, body.overlap) == (rotate, None, trust_cli.DEFAULT_OVERLAP)
    assert body.cert == ca.certificate.public_bytes(Encoding.DER)
    args = parser.parse_args(
        ["keys", "rotate", target, "--new-ca", str(cert_file), "--overlap", "-1"]
    )
    with pytest.raises(ConfigError, match="--overlap"):
        trust_cli.proposal(args, bytes(16))
    with pytest.raises(SystemExit):
        parser.parse_args(["keys", "rotate", target])  # --new-ca is required

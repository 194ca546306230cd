"""The broker's CRL file across a device CA rollover, over a real Mosquitto 2.0.11 with
``crlfile`` (docs/operations.md, "Rolling over the device CA"). Mosquitto checks every client
certificate against a CRL of its issuer and refuses a client whose CA has none in the file, so
after the rollover the file the service writes (``revocation.write_broker_crl``) carries the
new device CA's CRL and, while the trust bundle still accepts the old CA, the same CRL signed by
the old CA (``RevocationSettings.previous``): devices with old-CA certificates still connect
until they renew, a revoked old-CA certificate is still refused, new-CA devices connect. Without
the old CA's CRL (a service that does not hold its key) the old-CA devices are locked out: what
the runbook's warning is about."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from provisioning import pki, revocation
from tests.broker.test_attacks_revoke_broker import REVOKED_ALERT, mqtt_connect
from tests.fixtures.mosquitto import BrokerFactory, BrokerPKI

pytestmark = pytest.mark.broker


def test_old_ca_devices_connect_until_they_renew_and_revoked_ones_do_not(
    tmp_path: Path, broker_pki: BrokerPKI, mosquitto_factory: BrokerFactory
) -> None:
    now = datetime.now(UTC)
    old_ca = pki.create_ca("rollover device CA 1", now=now, valid_for=timedelta(days=2))
    new_ca = pki.create_ca("rollover device CA 2", now=now, valid_for=timedelta(days=2))
    old_device = broker_pki.client("dev-old", "device", ca=old_ca)
    revoked = broker_pki.client("dev-revoked", "device", ca=old_ca)
    new_device = broker_pki.client("dev-new", "device", ca=new_ca)
    serial = pki.cert_from_pem(revoked.cert_file.read_bytes()).serial_number

    stamp = int(now.timestamp())
    crl = revocation.build_crl(
        new_ca, [(serial, stamp - 5)], number=7, this_update=stamp - 60, next_update=stamp + 3600
    )
    crl_file = tmp_path / "crl.pem"
    settings = revocation.RevocationSettings(
        device_ca=new_ca,
        crl_file=crl_file,
        broker_crls=(broker_pki.ca_crl_file(),),
        previous=(old_ca,),
    )
    assert revocation.write_broker_crl(settings, crl)
    data = crl_file.read_bytes()
    assert data.count(b"-----BEGIN X509 CRL-----") == 3
    # written again with nothing changed: the same file (the broker is not restarted for it),
    # although the old CA's copy is signed anew
    assert not revocation.write_broker_crl(settings, crl)
    assert crl_file.read_bytes() == data

    broker = mosquitto_factory(
        extra_ca_certs=(old_ca.certificate, new_ca.certificate), crl_file=crl_file
    )
    assert mqtt_connect(broker, old_device.cert_file, old_device.key_file, "dev-old") == "connack"
    assert mqtt_connect(broker, new_device.cert_file, new_device.key_file, "dev-new") == "connack"
    # refused in the handshake (the client sees the alert or, with TLS 1.3, an EOF first)
    refused = mqtt_connect(broker, revoked.cert_file, revoked.key_file, "dev-revoked")
    assert refused in (REVOKED_ALERT, "None"), refused
    # the CRL that refuses it is the old CA's copy in the file
    blocks = [b"-----BEGIN X509 CRL-----" + b for b in data.split(b"-----BEGIN X509 CRL-----")[1:]]
    crls = [x509.load_pem_x509_crl(b) for b in blocks]
    (by_old,) = [c for c in crls if c.is_signature_valid(old_ca.private_key.public_key())]
    assert by_old.get_revoked_certificate_by_serial_number(serial) is not None
    assert revocation.crl_number(by_old) == 7

    # a file without the old CA's CRL: its devices are refused by the broker
    alone = revocation.RevocationSettings(
        device_ca=new_ca, crl_file=crl_file, broker_crls=(broker_pki.ca_crl_file(),)
    )
    newer = revocation.build_crl(
        new_ca, [(serial, stamp - 5)], number=8, this_update=stamp - 60, next_update=stamp + 3600
    )
    assert revocation.write_broker_crl(alone, newer)
    broker.restart()
    assert mqtt_connect(broker, old_device.cert_file, old_device.key_file, "dev-old") != "connack"
    assert mqtt_connect(broker, new_device.cert_file, new_device.key_file, "dev-new") == "connack"

"""Factory enrollment time per device, with swtpm and credential activation.

Not a test: prints a JSON list of records to stdout (progress to stderr).

The parts are the product's: a manufacturer CA (firmware_sim.swtpm, swtpm_localca), one freshly
manufactured swtpm per device (its own EK and EK certificate; manufacturing is NOT timed: it
happens before the device reaches the station), the device's factory mode served on a real pty
(``agent.factory.serve_factory_on_pty``), the ``keyprovision`` station logic over pyserial
(``provisioning.station.Station``), the enrollment API over HTTPS with mutual TLS
(``provisioning.http``) and a SQLite registry file. Timed: the station's whole run per device
(identity, key creation in the TPM, certify, enroll start, MakeCredential /
ActivateCredential, enroll finish with the DevID certificate, install, lock), and within it
the enrollment exchange (start .. finish).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.factory import serve_factory_on_pty
from agent.serial_link import SerialClient
from agent.tpm.store import TPMStore
from bench.deployment import client_identity
from firmware_sim.broker import SERVICE_IDENTITY
from firmware_sim.swtpm import Swtpm, make_manufacturer_ca, provision
from provisioning import pki
from provisioning.enroll import Enrollment, EnrollmentSettings
from provisioning.http import build_app, start_enrollment_server
from provisioning.registry import (
    Registry,
    cert_fingerprint,
    create_schema,
    make_engine,
    run_in_transaction,
    session_factory,
)
from provisioning.station import FleetClient, Station

DEVICES = 5
TARGET = 1.5
STATION = "station-bench"


def main() -> None:
    now = datetime.now(UTC)
    valid = timedelta(days=2)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        files = base / "pki"
        files.mkdir()
        device_ca = pki.create_ca("bench device CA", now=now, valid_for=valid)
        station_ca = pki.create_ca("bench station CA", now=now, valid_for=valid)
        tls_ca = pki.create_ca("bench enrollment TLS CA", now=now, valid_for=valid)
        broker_ca = pki.create_ca("bench broker CA", now=now, valid_for=valid)
        _, service_cert = client_identity(
            broker_ca, SERVICE_IDENTITY, "service", now=now, valid=valid
        )
        station_key, station_cert = client_identity(
            station_ca, STATION, "station", now=now, valid=valid
        )
        server_key = pki.generate_key()
        server_cert = pki.issue_server_cert(
            tls_ca,
            server_key.public_key(),
            common_name="keyfleet-enroll",
            ip_addresses=["127.0.0.1"],
            dns_names=["localhost"],
            now=now,
            valid_for=valid,
        )
        pki.write_certificate(files / "station.pem", station_cert)
        pki.write_private_key(files / "station.key", station_key)
        pki.write_certificate(files / "station-ca.pem", station_ca.certificate)
        pki.write_certificate(files / "server.pem", server_cert)
        pki.write_private_key(files / "server.key", server_key)
        pki.write_certificate(files / "server-ca.pem", tls_ca.certificate)

        print("making the manufacturer CA ...", file=sys.stderr)
        manufacturer = make_manufacturer_ca(base / "manufacturer", "keyfleet-bench-mfr")
        provision(base / "template-tpm", manufacturer)  # swtpm_localca makes its keys here

        engine = make_engine(f"sqlite:///{base / 'fleet.db'}")
        stack.callback(engine.dispose)
        create_schema(engine)
        sessions = session_factory(engine)
        run_in_transaction(
            sessions,
            lambda s: Registry(s).add_station(
                STATION, cert_fingerprint=cert_fingerprint(station_cert), now=int(now.timestamp())
            ),
        )
        settings = EnrollmentSettings(
            manufacturer_cas=(manufacturer.root_cert(), manufacturer.issuer_cert()),
            device_ca=device_ca,
            broker_host="127.0.0.1",
            broker_port=8883,
            broker_ca=(broker_ca.certificate,),
            service_cert=service_cert,
        )
        server = start_enrollment_server(
            build_app(Enrollment(settings, sessions)),
            server_cert=files / "server.pem",
            server_key=files / "server.key",
            station_ca=files / "station-ca.pem",
        )
        stack.callback(server.stop)

        runs: list[dict[str, Any]] = []
        for i in range(DEVICES):
            state = base / f"tpm{i}"
            provision(state, manufacturer)  # manufacturing: not part of the factory run
            tpm = Swtpm(state_dir=state, log_path=base / f"swtpm{i}.log")
            tpm.start()
            stack.callback(tpm.stop)
            store = stack.enter_context(TPMStore(tpm.tcti))
            path, console = serve_factory_on_pty(store, base / f"dev{i}", serial_number=f"SN-{i}")
            stack.callback(console.stop)
            link = SerialClient.open(path, timeout=5.0, retries=2)
            fleet = FleetClient(
                server.url,
                cert=files / "station.pem",
                key=files / "station.key",
                ca=files / "server-ca.pem",
            )
            try:
                report = Station(link, fleet).provision()
            finally:
                link.close()
            if not report.ok:
                raise RuntimeError(f"device {i} was not provisioned: {report.to_json()}")
            runs.append(
                {
                    "device": report.device_id,
                    "station_run_s": round(report.seconds, 3),
                    "enrollment_s": round(report.enrollment_seconds, 3),
                    "steps": {s.name: round(s.seconds, 3) for s in report.steps},
                }
            )
            print(f"device {i}: {runs[-1]}", file=sys.stderr)

    whole = [r["station_run_s"] for r in runs]
    enroll = [r["enrollment_s"] for r in runs]
    records = [
        {
            "name": "factory_enrollment_per_device",
            "value": max(whole),
            "unit": "s (worst of the devices)",
            "target": TARGET,
            "met": max(whole) <= TARGET,
            "detail": (
                f"{DEVICES} fresh swtpm devices, station over a pty, HTTPS mTLS enrollment API, "
                f"credential activation included: whole station run median "
                f"{statistics.median(whole):.3f} s, max {max(whole):.3f} s; enrollment exchange "
                f"(start..finish) median {statistics.median(enroll):.3f} s"
            ),
            "runs": runs,
        },
        {
            "name": "factory_enrollment_exchange",
            "value": max(enroll),
            "unit": "s (worst, start..finish)",
            "target": None,
            "met": None,
        },
    ]
    print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()

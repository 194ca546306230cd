"""Does Mosquitto's dynamic security plugin refuse a client authenticated by its certificate?

Not a test and not a benchmark: an observation kept so that the choice in docs/operations.md
("Revocation": CRL + restart, not dynsec) can be checked again on another Mosquitto. Prints a
JSON map of what happened.

Mosquitto 2.0 with Debian's ``mosquitto_dynamic_security.so``, a TLS listener with
``require_certificate`` and ``use_identity_as_username`` (the fleet's), and a plain loopback
listener with a password for the plugin's admin (``mosquitto_ctrl``). Two devices ``dev-x`` and
``dev-y`` are dynsec clients with a role that may read everything. Observed: ``disableClient
dev-x`` kicks its connection but its reconnect is accepted and it still receives a commit;
after ``deleteClient dev-x`` its connect is still accepted (it receives nothing any more).
"""

from __future__ import annotations

import getpass
import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from firmware_sim.broker import mosquitto_binary
from firmware_sim.ports import free_port
from provisioning import pki

PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
TOPIC = "kf/v1/grp/g/commit"


def _files(d: Path) -> None:
    now = datetime.now(UTC)
    ca = pki.create_ca("probe CA", now=now, valid_for=timedelta(days=1))
    pki.write_certificate(d / "ca.pem", ca.certificate)
    key = pki.generate_key()
    pki.write_certificate(
        d / "server.pem",
        pki.issue_server_cert(
            ca, key.public_key(), common_name="mosquitto", dns_names=["localhost"],
            ip_addresses=["127.0.0.1"], now=now, valid_for=timedelta(days=1),
        ),
    )  # fmt: skip
    pki.write_private_key(d / "server.key", key)
    for name in ("dev-x", "dev-y"):
        key = pki.generate_key()
        pki.write_certificate(
            d / f"{name}.pem",
            pki.issue_client_cert(
                ca, key.public_key(), identity=name, role="device", now=now,
                valid_for=timedelta(days=1),
            ),
        )  # fmt: skip
        pki.write_private_key(d / f"{name}.key", key)


class Client:
    """A paho client with the certificate of ``name``; records connects, drops and messages."""

    def __init__(self, d: Path, name: str, port: int) -> None:
        self.events: list[str] = []
        self.received: list[str] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
        self.client.tls_set(
            ca_certs=str(d / "ca.pem"),
            certfile=str(d / f"{name}.pem"),
            keyfile=str(d / f"{name}.key"),
        )
        self.client.on_connect = lambda *a: self.events.append(f"connack {a[3]}")
        self.client.on_disconnect = lambda *a: self.events.append(f"dropped {a[3]}")
        self.client.on_message = lambda _c, _u, m: self.received.append(m.topic)
        self.client.reconnect_delay_set(0.1, 0.2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run(d: Path) -> dict[str, Any]:
    _files(d)
    tls_port, admin_port = free_port(), free_port()
    dynsec = d / "dynsec.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(dynsec), "admin", "adminpw"],
                   check=True, capture_output=True)  # fmt: skip
    (d / "mosquitto.conf").write_text(
        f"per_listener_settings false\nuser {getpass.getuser()}\nplugin {PLUGIN}\n"
        f"plugin_opt_config_file {dynsec}\nlistener {admin_port} 127.0.0.1\n"
        f"listener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\n"
        f"keyfile {d}/server.key\nrequire_certificate true\nuse_identity_as_username true\n"
    )
    broker = subprocess.Popen([mosquitto_binary(), "-c", str(d / "mosquitto.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(1.0)

    def ctrl(*args: str) -> None:
        admin = ["-h", "127.0.0.1", "-p", str(admin_port), "-u", "admin", "-P", "adminpw"]
        subprocess.run(["mosquitto_ctrl", *admin, "dynsec", *args], check=True, capture_output=True)

    observed: dict[str, Any] = {}
    try:
        ctrl("createRole", "dev")
        for acl in ("subscribePattern", "publishClientSend", "publishClientReceive"):
            ctrl("addRoleACL", "dev", acl, "#", "allow", "5")
        for name in ("dev-x", "dev-y"):
            ctrl("createClient", name, "-p", "unused")
            ctrl("addClientRole", name, "dev")
        x, y = Client(d, "dev-x", tls_port), Client(d, "dev-y", tls_port)
        time.sleep(1.0)
        ctrl("disableClient", "dev-x")
        time.sleep(1.5)
        x.client.subscribe("kf/#", qos=1)
        time.sleep(0.5)
        y.client.publish(TOPIC, b"c", qos=1)
        time.sleep(1.0)
        observed["disabled"] = {"events": list(x.events), "received": list(x.received)}
        x.close()
        ctrl("deleteClient", "dev-x")
        z = Client(d, "dev-x", tls_port)
        time.sleep(1.0)
        z.client.subscribe("kf/#", qos=1)
        time.sleep(0.5)
        y.client.publish(TOPIC, b"c", qos=1)
        time.sleep(1.0)
        observed["deleted"] = {"events": list(z.events), "received": list(z.received)}
        z.close()
        y.close()
    finally:
        broker.terminate()
        broker.wait(10)
    return observed


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kf-probe-dynsec-") as tmp:
        json.dump(run(Path(tmp)), sys.stdout, indent=1)
        print()


if __name__ == "__main__":
    main()

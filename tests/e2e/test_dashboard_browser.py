"""The dashboard in a real browser against a real installation: ``firmware_sim.lab`` (Mosquitto,
``keyfleet serve`` with ``[dashboard]``, four simulated devices with swtpm and their agents) and
Debian's Chromium driven headless by Selenium through the system chromedriver (no browser
download).

Chromium itself does the mutual TLS: the operator's certificate and key are imported into an
NSS database in the browser's own ``$HOME/.pki/nssdb`` (with the dashboard's server CA as a
trusted CA), and the profile's ``auto_select_certificate`` content setting (what the
AutoSelectCertificateForUrls policy sets) picks that certificate for the dashboard's origin
without a dialog. Nothing terminates TLS on the browser's behalf.

The test loads every page and checks it against the registry, watches a rekey's acks arrive on
the group page without a reload, renders every page over HTTPS and searches it for the agents'
group secrets and every private key of the installation, and saves screenshots (to
``docs/img/`` when ``KEYFLEET_SAVE_SCREENSHOTS=1``).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from sqlalchemy import delete

from firmware_sim.lab import Lab
from firmware_sim.ports import free_port
from provisioning import pki
from provisioning.dashboard import queries
from provisioning.dashboard.app import _fmt_ms
from provisioning.db.schema import DeviceTag
from provisioning.registry import DeviceState

pytestmark = pytest.mark.e2e

LAB_OPTIONS = {"devices": 4, "ack_timeout": 20, "commit_request_timeout": 3, "quarantine": True}
G = "fleet-a"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ROOT = Path(__file__).resolve().parents[2]
SAVE_TO = ROOT / "docs" / "img"
DESKTOP = (1280, 1000)
PHONE = (390, 844)


@dataclass
class Site:
    lab: Lab
    url: str
    port: int
    server_ca: Path
    server_key: Path
    shots: Path


def _operator_files(lab: Lab, name: str) -> tuple[Path, Path]:
    assert lab.pki is not None
    identity = lab.pki.operators[name]
    return identity.cert, identity.key


@pytest.fixture(scope="module")
def site(fleet_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Site:
    """The lab's ``keyfleet serve`` restarted with a ``[dashboard]`` listener."""
    lab = fleet_lab
    directory = tmp_path_factory.mktemp("dashboard-site")
    now = datetime.now(UTC)
    ca = pki.create_ca("keyfleet lab dashboard CA", now=now, valid_for=timedelta(days=2))
    key = pki.generate_key()
    cert = pki.issue_server_cert(
        ca, key.public_key(), common_name="keyfleet-dashboard", dns_names=["localhost"],
        ip_addresses=["127.0.0.1"], now=now, valid_for=timedelta(days=1),
    )  # fmt: skip
    pki.write_certificate(directory / "dashboard-ca.pem", ca.certificate)
    pki.write_certificate(directory / "dashboard.pem", cert)
    pki.write_private_key(directory / "dashboard.key", key)
    port = free_port()
    with lab.service_config.open("a") as config:
        config.write(
            f'\n[dashboard]\nlisten = "127.0.0.1:{port}"\n'
            f'tls_cert = "{directory / "dashboard.pem"}"\n'
            f'tls_key = "{directory / "dashboard.key"}"\n'
        )
    lab.stop_service()
    lab.start_service()
    assert f"dashboard on https://127.0.0.1:{port}".encode() in lab.service_log.read_bytes()
    shots = directory / "shots"
    shots.mkdir()
    return Site(
        lab, f"https://127.0.0.1:{port}", port, directory / "dashboard-ca.pem",
        directory / "dashboard.key", shots,
    )  # fmt: skip


def _https(
    site: Site, path: str, *, cert: Path | None, key: Path | None, method: str = "GET"
) -> tuple[int, str]:
    context = ssl.create_default_context(cafile=str(site.server_ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection("127.0.0.1", site.port, context=context, timeout=30)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


class Browser:
    """Headless Chromium (Debian's) through chromedriver, presenting ``operator``'s client
    certificate from its own NSS database."""

    def __init__(self, site: Site, operator: str, home: Path) -> None:
        assert CHROMIUM.is_file() and CHROMEDRIVER.is_file(), (
            "apt-get install chromium chromium-driver"
        )
        cert_path, key_path = _operator_files(site.lab, operator)
        nss = home / ".pki" / "nssdb"
        nss.mkdir(parents=True)
        subprocess.run(["certutil", "-N", "-d", f"sql:{nss}", "--empty-password"], check=True)
        subprocess.run(
            ["certutil", "-A", "-d", f"sql:{nss}", "-n", "dashboard-ca", "-t", "C,,", "-i",
             str(site.server_ca)],
            check=True,
        )  # fmt: skip
        password = os.urandom(12).hex()
        bundle = pkcs12.serialize_key_and_certificates(
            operator.encode(),
            pki.key_from_pem(key_path.read_bytes()),
            pki.cert_from_pem(cert_path.read_bytes()),
            None,
            serialization.BestAvailableEncryption(password.encode()),
        )
        (home / "operator.p12").write_bytes(bundle)
        subprocess.run(
            ["pk12util", "-i", str(home / "operator.p12"), "-d", f"sql:{nss}", "-W", password],
            check=True,
            capture_output=True,
        )
        (home / "operator.p12").unlink()
        profile = home / "profile"
        (profile / "Default").mkdir(parents=True)
        operator_ca = site.lab.pki.operator_ca if site.lab.pki else None
        assert operator_ca is not None
        issuer = pki.common_name(pki.cert_from_pem(operator_ca.read_bytes()))
        preferences = {
            "profile": {
                "content_settings": {
                    "exceptions": {
                        "auto_select_certificate": {
                            f"{site.url},*": {"setting": {"filters": [{"ISSUER": {"CN": issuer}}]}}
                        }
                    }
                }
            }
        }
        (profile / "Default" / "Preferences").write_text(json.dumps(preferences))
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={DESKTOP[0]},{DESKTOP[1]}",
        ):
            options.add_argument(arg)
        env = dict(os.environ, HOME=str(home))
        self.driver = webdriver.Chrome(
            service=Service(executable_path=str(CHROMEDRIVER), env=env), options=options
        )
        self.driver.set_page_load_timeout(30)
        self.site = site

    def open(self, path: str) -> str:
        self.driver.get(self.site.url + path)
        return self.driver.page_source

    def text(self, css: str) -> str:
        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)

    def js(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def wait(self, script: str, timeout: float = 60.0) -> Any:
        return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
            lambda d: d.execute_script(script)
        )

    def size(self, width: int, height: int) -> None:
        self.driver.set_window_size(width, height)

    def shot(self, name: str, *, full: bool = True) -> Path:
        path = self.site.shots / name
        if full:
            metrics = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
            size = metrics["cssContentSize"]
            data = self.driver.execute_cdp_cmd(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": size["width"],
                             "height": min(size["height"], 3000), "scale": 1},
                },
            )  # fmt: skip
            path.write_bytes(base64.b64decode(data["data"]))
        else:
            self.driver.save_screenshot(str(path))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return path

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def browser(site: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    instance = Browser(site, "op-view", tmp_path_factory.mktemp("chromium-home"))
    try:
        yield instance
    finally:
        instance.quit()
        if os.environ.get("KEYFLEET_SAVE_SCREENSHOTS") == "1":
            SAVE_TO.mkdir(parents=True, exist_ok=True)
            for shot in sorted(site.shots.glob("*.png")):
                shutil.copyfile(shot, SAVE_TO / shot.name)


# ---- the installation behind the pages -----------------------------------------------------------


def test_fleet_setup_group_attestation_and_a_tampered_device(site: Site) -> None:
    """What the pages will show: a group of four, three trusted devices, and one rebooted
    into a tampered kernel, found untrusted and quarantined out of the group."""
    lab = site.lab
    created = lab.op("group", "create", G, "--members", *lab.device_ids, timeout=120)
    assert created.returncode == 0, str(created)
    for device in lab.devices[:3]:
        result = lab.op("attest", device.id, timeout=120)
        assert result.returncode == 0, str(result)
    tampered = lab.devices[3]
    lab.reboot(tampered, tamper=("kernel",))
    result = lab.op("attest", tampered.id, timeout=120)
    assert result.returncode == 1 and "kernel" in json.dumps(result.final), str(result)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = lab.ack_status(G)
        if len(status.members) == 3 and not status.stragglers:
            break
        time.sleep(0.3)
    else:
        raise AssertionError(f"the quarantined device was not removed: {lab.ack_status(G)}")


# ---- who gets a page, through the real keyfleet serve -------------------------------------------


def test_refusals_through_keyfleet_serve(site: Site) -> None:
    lab = site.lab
    assert lab.pki is not None
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        _https(site, "/", cert=None, key=None)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):  # a station's certificate
        _https(site, "/", cert=lab.pki.station.cert, key=lab.pki.station.key)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):  # the service's (TLS CA)
        _https(site, "/", cert=lab.pki.service.cert, key=lab.pki.service.key)
    cert, key = _operator_files(lab, "op-view")
    assert _https(site, "/", cert=cert, key=key)[0] == 200
    for method in ("POST", "PUT", "DELETE"):
        status, body = _https(site, f"/groups/{G}", cert=cert, key=key, method=method)
        assert status == 405 and "read-only" in body
    # and the enrollment API still takes station certificates only
    context = ssl.create_default_context(cafile=str(lab.pki.tls_ca))
    context.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", lab.enrollment_port, context=context, timeout=10
    )
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        conn.request("POST", "/v1/enroll/start", body=b"", headers={})
        conn.getresponse().read()
    conn.close()


# ---- pages in the browser -----------------------------------------------------------------------


def test_overview_in_the_browser(site: Site, browser: Browser) -> None:
    lab = site.lab
    browser.size(*DESKTOP)
    browser.open("/")
    assert browser.text("#viewer").startswith("op-view")
    assert browser.text("#total-devices") == str(len(lab.devices))
    states = {d["device_id"]: d for d in lab.fleet_devices()}
    for state in DeviceState:
        expected = sum(1 for d in states.values() if d["state"] == state.value)
        assert browser.text(f'#by-state td[data-state="{state.value}"]') == str(expected)
    assert browser.text('#by-attestation td[data-attestation="untrusted"]') == "1"
    assert lab.devices[3].id in browser.text("#attention")
    browser.shot("dashboard-overview.png")
    browser.size(*PHONE)
    browser.open("/")
    width = browser.js("return document.documentElement.scrollWidth")
    assert width <= PHONE[0] + 1, f"the overview scrolls sideways on a phone: {width}px"
    browser.shot("dashboard-phone-overview.png")
    browser.size(*DESKTOP)


def test_devices_and_the_tampered_device_in_the_browser(site: Site, browser: Browser) -> None:
    lab = site.lab
    browser.open("/devices")
    rows = browser.js(
        "return [...document.querySelectorAll('#devices tbody tr[data-device]')]"
        ".map(r => r.dataset.device)"
    )
    assert rows == sorted(lab.device_ids)
    browser.shot("dashboard-devices.png")
    tampered = lab.devices[3]
    browser.open(f"/devices/{tampered.id}")
    assert browser.text("#device-id") == tampered.id
    assert "quarantined" in browser.text(".cards")
    assert "kernel" in browser.text("#attestation-reason")
    assert browser.text("#attestations td.component") == "kernel"
    keys = lab.registry(lambda r: r.key_states(tampered.id))
    assert keys
    shown = browser.js(
        "return [...document.querySelectorAll('#keys tr[data-key]')].map(r => r.dataset.key)"
    )
    assert shown == [k.key_name for k in keys][: len(shown)] and len(shown) == min(len(keys), 50)
    record = lab.registry(lambda r: r.device(tampered.id))
    fingerprint = pki.cert_from_pem(record.devid_cert_pem.encode()).fingerprint(hashes.SHA256())
    assert browser.text("#cert-fingerprint") == fingerprint.hex()
    browser.shot("dashboard-device.png")


def test_a_rekey_arrives_live_on_the_group_page(site: Site, browser: Browser) -> None:
    lab = site.lab
    status = lab.ack_status(G)
    members = sorted(status.members)
    browser.size(*DESKTOP)
    browser.open(f"/groups/{G}")
    assert browser.text("#epoch") == str(status.epoch)
    browser.wait("return document.getElementById('live-status').textContent === 'live'", 30)
    assert browser.text("#acked") == str(len(members))
    # no reload may happen from here on: this marker would be gone
    browser.js(
        "window.kfMarker = 'same page';"
        "window.kfSeen = [];"
        "new MutationObserver(() => window.kfSeen.push([document.getElementById('epoch')"
        ".textContent, document.getElementById('acked').textContent]))"
        ".observe(document.getElementById('live'), {subtree: true, childList: true,"
        " characterData: true});"
    )
    running = lab.keyfleet_start("rekey", "--group", G, "--json", operator="op-ops")
    new_epoch = status.epoch + 1
    browser.wait(
        f"return document.getElementById('epoch').textContent === '{new_epoch}' && "
        f"document.querySelectorAll('#members-table tr.acked').length === {len(members)} && "
        f"document.querySelectorAll('#ack-feed li').length === {len(members)}",
        90,
    )
    done = running.wait(120)
    assert done.returncode == 0 and done.final is not None and done.final["status"] == "done"
    assert browser.js("return window.kfMarker") == "same page"
    seen = browser.js("return window.kfSeen")
    assert any(epoch == str(new_epoch) for epoch, _ in seen), seen  # updated in place
    feed = browser.js(
        "return [...document.querySelectorAll('#ack-feed li')].map(li => li.dataset.device)"
    )
    assert sorted(feed) == members
    assert browser.js("return document.getElementById('ack-chart').dataset.acks") == str(
        len(members)
    )
    assert browser.js("return document.querySelectorAll('#ack-chart circle.ack').length") == len(
        members
    )
    after = lab.ack_status(G)
    assert after.epoch == new_epoch and not after.stragglers
    assert browser.text("#pending") == "0"
    # the rekey's result and its commit came in through the stream too
    browser.wait("return document.getElementById('rekey-result').textContent.startsWith('done')")
    assert browser.text("#rekey-by").startswith("op-ops at ")
    top = browser.js("return document.querySelector('#commits tbody tr').dataset.epoch")
    assert top == str(status.epoch)
    # ack latency and the rekey's duration in milliseconds (schema revision 0003), as the
    # stream filled them in: every member's ack came after the commit and the whole rekey,
    # from the operator's command to its result, took longer than any one ack's latency
    latencies = browser.js(
        "return Object.fromEntries([...document.querySelectorAll('#members-table tr')]"
        ".filter(tr => tr.dataset.device).map(tr => [tr.dataset.device,"
        " tr.querySelector('td.latency').dataset.ms]))"
    )
    duration = int(browser.js("return document.getElementById('rekey-duration').dataset.ms"))
    assert sorted(latencies) == members
    assert all(0 < int(ms) < duration for ms in latencies.values()), (latencies, duration)
    # the same values as the service recorded them
    with lab.session() as session:
        detail = queries.group_detail(session, G, member_page=1, per_page=100)
        rekey = queries.last_rekey(session, G)
    assert detail is not None and rekey is not None and rekey.duration_ms == duration
    assert {m.device_id: str(m.latency_ms) for m in detail.members.rows} == latencies
    assert browser.text("#rekey-duration") == _fmt_ms(duration)
    assert browser.js("return window.kfMarker") == "same page"
    browser.shot("dashboard-group-live.png")
    browser.size(*PHONE)
    browser.open(f"/groups/{G}")
    browser.wait("return document.getElementById('live-status').textContent === 'live'", 30)
    browser.shot("dashboard-phone-group.png")
    browser.size(*DESKTOP)


def test_a_late_ack_arrives_after_the_others(site: Site, browser: Browser) -> None:
    """One member's agent is paused (SIGSTOP) through a rekey: the page shows the others acked
    and that member pending; once it runs again its ack arrives, still without a reload."""
    lab = site.lab
    status = lab.ack_status(G)
    members = sorted(status.members)
    late = next(d for d in lab.devices if d.id == members[-1])
    browser.open(f"/groups/{G}")
    browser.wait("return document.getElementById('live-status').textContent === 'live'", 30)
    browser.js("window.kfMarker = 'same page';")
    new_epoch = status.epoch + 1
    lab.pause_agent(late)
    try:
        running = lab.keyfleet_start("rekey", "--group", G, "--json", operator="op-ops")
        browser.wait(
            f"return document.getElementById('epoch').textContent === '{new_epoch}' && "
            f"document.querySelectorAll('#members-table tr.acked').length === "
            f"{len(members) - 1}",
            90,
        )
        assert browser.text("#pending") == "1"
        row = browser.js(
            f"return document.getElementById('member-{late.id}').querySelector('td.ack')"
            ".textContent"
        )
        assert row == "pending"
        browser.shot("dashboard-group-rekey-waiting.png")
    finally:
        lab.resume_agent(late)
    browser.wait(
        f"return document.querySelectorAll('#members-table tr.acked').length === {len(members)}",
        90,
    )
    assert browser.text("#pending") == "0"
    assert browser.js("return window.kfMarker") == "same page"
    feed = browser.js(
        "return [...document.querySelectorAll('#ack-feed li')].map(li => li.dataset.device)"
    )
    assert feed[0] == late.id  # the newest entry is on top
    done = running.wait(120)
    assert done.returncode == 0 and done.final is not None, str(done)


def test_groups_and_audit_pages_in_the_browser(site: Site, browser: Browser) -> None:
    lab = site.lab
    browser.open("/groups")
    row = browser.js(
        f"return [...document.querySelectorAll('#groups tr[data-group=\"{G}\"] td')]"
        ".map(td => td.textContent.trim())"
    )
    status = lab.ack_status(G)
    assert row[:5] == [
        G,
        str(status.epoch),
        str(len(status.members)),
        str(len(status.members)),
        "0",
    ]
    browser.shot("dashboard-groups.png")
    browser.open("/audit")
    assert "Hash chain verified" in browser.text("#chain-status")
    head = lab.audit_head()
    first = browser.js("return document.querySelector('#audit tr[data-seq]').dataset.seq")
    assert int(first) >= head - 5  # a few service entries may land between the two reads
    browser.open("/audit?q=attest.verdict")
    actions = browser.js(
        "return [...document.querySelectorAll('#audit tr[data-seq] td:nth-child(4)')]"
        ".map(td => td.textContent)"
    )
    assert actions and set(actions) == {"attest.verdict"}
    browser.open("/audit")
    browser.shot("dashboard-audit.png")


def test_device_tags_in_the_browser(site: Site, browser: Browser) -> None:
    """Tags set by ``keyfleet device tag`` show on the device list (as links filtering it) and
    on the device page; a tag row holding HTML (refused by the registry, ``tag.invalid``, so
    written straight into the database here) is shown as text: Chromium builds no element
    from it."""
    lab = site.lab
    first, second = lab.device_ids[0], lab.device_ids[1]
    tagged = lab.keyfleet(
        "device", "tag", first, "--add", "line-3", "--add", "eu", operator="op-ops"
    )
    assert tagged.returncode == 0 and f"{first}: tags eu, line-3" in tagged.stdout, str(tagged)
    evil = '"><b id=evil>x</b>'
    with lab.session() as session:
        session.add(DeviceTag(device_id=second, tag=evil, added_at=int(time.time())))
        session.commit()
    browser.open("/devices")
    cells = browser.js(
        "return Object.fromEntries([...document.querySelectorAll('#devices tr[data-device]')]"
        ".map(r => [r.dataset.device, [...r.querySelectorAll('td.tags a.tag')]"
        ".map(a => a.textContent)]))"
    )
    assert cells[first] == ["eu", "line-3"] and cells[second] == [evil], cells
    assert browser.js("return document.getElementById('evil')") is None
    browser.driver.find_element(
        By.CSS_SELECTOR, f'tr[data-device="{first}"] a[data-tag="line-3"]'
    ).click()
    browser.wait("return location.search === '?tag=line-3'", 30)
    rows = browser.js(
        "return [...document.querySelectorAll('#devices tbody tr[data-device]')]"
        ".map(r => r.dataset.device)"
    )
    assert rows == [first]
    assert browser.js("return document.querySelector('input[name=tag]').value") == "line-3"
    browser.open(f"/devices/{second}")
    assert browser.text("#device-tags") == evil
    assert browser.js("return document.getElementById('evil')") is None
    browser.open(f"/devices/{first}")
    assert browser.text("#device-tags") == "eu line-3"
    with lab.session() as session:
        session.execute(delete(DeviceTag).where(DeviceTag.device_id == second))
        session.commit()


# ---- no secret reaches a page -------------------------------------------------------------------


def _all_pages(site: Site, cert: Path, key: Path) -> dict[str, str]:
    lab = site.lab
    paths = ["/", "/devices", "/groups", f"/groups/{G}", "/audit", "/keys"]
    paths += ["/static/dashboard.js"]
    paths += [f"/devices/{d}" for d in lab.device_ids]
    pages: dict[str, str] = {}
    for path in paths:
        status, body = _https(site, path, cert=cert, key=key)
        assert status == 200, path
        pages[path] = body
    older: str | None = "/audit"
    while older is not None:
        status, body = _https(site, older, cert=cert, key=key)
        pages[older] = body
        match = re.search(r'href="(/audit\?before=\d+)"', body)
        older = match.group(1) if match else None
    context = ssl.create_default_context(cafile=str(site.server_ca))
    context.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection("127.0.0.1", site.port, context=context, timeout=30)
    try:
        conn.request("GET", f"/groups/{G}/events")
        response = conn.getresponse()
        lines = [response.fp.readline().decode() for _ in range(6)]
        pages["events"] = "".join(lines)
        assert '"acks"' in pages["events"]
    finally:
        conn.close()
    return pages


def _forms(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
    ]


def test_no_secret_or_private_key_reaches_any_page(site: Site) -> None:
    lab = site.lab
    assert lab.pki is not None
    cert, key = _operator_files(lab, "op-view")
    pages = _all_pages(site, cert, key)
    assert len(pages) >= 10
    needles: dict[str, str] = {}
    # every private key file of the installation: its PEM lines and its private scalar
    key_files = [*lab.pki.directory.glob("*.key"), site.server_key]
    assert len(key_files) >= 8
    for path in key_files:
        pem = path.read_text()
        for line in pem.splitlines():
            if len(line) >= 40 and not line.startswith("-----"):
                needles[f"{path.name} PEM line"] = line
        private = pki.key_from_pem(pem.encode()).private_numbers().private_value
        needles[f"{path.name} scalar"] = f"{private:064x}"
    # every group secret the agents hold (epoch secrets, node private keys, data keys)
    count = 0
    for device in lab.devices[:3]:
        lab.stop_agent(device)
        for secret in lab.agent_secrets(device):
            value = secret.reveal()
            if len(value) < 16:
                continue
            for i, form in enumerate(_forms(value)):
                needles[f"{device.name} secret {count} form {i}"] = form
            count += 1
    assert count >= 3 * 4, count
    for name, body in pages.items():
        assert "PRIVATE KEY" not in body, name
        lowered = body.lower()
        for what, needle in needles.items():
            assert needle.lower() not in lowered, f"{what} appears on {name}"

"""The agent core follows the trust chain (agent.core, agent.protocol.trust): after a rollover it
takes messages signed by the new service key, and by the old one until the old one's end; a
device that missed rollovers catches up from the retained chain; a rogue chain changes nothing
and is reported. Pure: the FakeService of test_agent_core with software keys, the real test
operator CA."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core import AgentCore
from agent.protocol import trust
from agent.protocol.topics import TRUST_TOPIC
from agent.protocol.wire.messages.key_state import KeyStateReport
from agent.protocol.wire.messages.service import ReportRequest
from tests.operator_certs import membership
from tests.pure.test_agent_core import T0, FakeService, cmd, refused_without_change, state_bytes
from tests.trust_links import rollover, rotate_authz

pytestmark = pytest.mark.pure

OVERLAP = 600


def _device(service: FakeService, name: str = "dev-a", *, min_approvals: int = 1) -> AgentCore:
    return service.core(name, membership=membership(min_approvals=min_approvals))


def _rotate(
    service: FakeService, held: trust.TrustBundle, *, approvers: tuple[str, ...] = ("op-root",)
) -> tuple[trust.TrustBundle, trust.TrustLink, ec.EllipticCurvePrivateKey]:
    new = ec.generate_private_key(ec.SECP256R1())
    bundle, link = rollover(
        held, new.public_key(), service.key, until=service.now + OVERLAP, approvers=approvers
    )
    return bundle, link, new


def _asks_report(service: FakeService, core: AgentCore, now: int) -> str | None:
    """Deliver a ``svc.report_request`` signed by the service's current key at ``now``: the check
    id of its refusal, or None when it was taken."""
    payload = service.sign(ReportRequest(cmd()), core.device_id, time=now)
    out = core.handle(payload, core.command_topic, now)
    return None if out.refused is None else out.refused.check


def test_online_devices_switch_during_the_overlap_and_drop_the_old_key_after_it() -> None:
    service = FakeService()
    device = _device(service)
    old_key = service.key
    bundle, link, new = _rotate(service, device.trust)
    out = device.handle(trust.TrustChain((link,)).encode(), TRUST_TOPIC, T0)
    assert out.changed and out.refused is None and device.trust == bundle
    # the overlap: both keys sign messages the device takes
    assert _asks_report(service, device, T0 + 1) is None
    service.key = new
    assert _asks_report(service, device, T0 + 2) is None
    # the old key's end passed: only the new one
    service.key = old_key
    assert _asks_report(service, device, T0 + OVERLAP + 1) == "cose.kid-unknown"
    service.key = new
    assert _asks_report(service, device, T0 + OVERLAP + 2) is None
    # the same chain again (a reconnect) is no refusal and changes nothing
    again = device.handle(trust.TrustChain((link,)).encode(), TRUST_TOPIC, T0 + OVERLAP + 3)
    assert again.refused is None and not again.changed


def test_the_device_reports_the_bundle_it_holds() -> None:
    service = FakeService()
    device = _device(service)
    _, link, _ = _rotate(service, device.trust)
    device.handle(trust.TrustChain((link,)).encode(), TRUST_TOPIC, T0)
    (body,) = service.bodies("dev-a", device.report(T0 + 1))
    assert isinstance(body, KeyStateReport) and body.trust_seq == 1


def test_an_offline_device_catches_up_on_the_chain_and_keeps_it_across_a_restart() -> None:
    service = FakeService()
    online, offline = _device(service, "dev-a"), _device(service, "dev-b")
    b1, l1, k1 = _rotate(service, online.trust)
    online.handle(trust.TrustChain((l1,)).encode(), TRUST_TOPIC, T0)
    service.key = k1
    b2, l2, k2 = _rotate(service, b1)
    service.key = k2
    # offline through both rollovers: the new key is not one it knows yet
    assert _asks_report(service, offline, T0 + 5) == "cose.kid-unknown"
    out = offline.handle(trust.TrustChain((l1, l2)).encode(), TRUST_TOPIC, T0 + 5)
    assert out.changed and offline.trust == b2
    assert _asks_report(service, offline, T0 + 6) is None
    # kept in its state: a restarted core restores the bundle
    restarted = service.restarted(offline, now=T0 + 7)
    restarted.restore(offline.to_state())
    assert restarted.trust == b2


def test_a_rogue_chain_changes_nothing_and_is_reported() -> None:
    """The attack: the service host, holding the real signing key, publishes a bundle handing
    trust to a key of its own without the admins' approval (or signed by a key of its own)."""
    service = FakeService()
    device = _device(service, min_approvals=2)
    before = state_bytes(device)
    # the real key signs, one admin approves where two are needed
    bundle, alone, _ = _rotate(service, device.trust)
    payload = trust.TrustChain((alone,)).encode()
    assert refused_without_change(device, payload, TRUST_TOPIC, T0) == "trust.approval"
    # a key the device does not trust signs, with a good quorum
    rogue = ec.generate_private_key(ec.SECP256R1())
    forged = trust.TrustLink(
        trust.sign_link(bundle, rogue),
        rotate_authz(bundle.encode(), approvers=("op-root", "op-root2")),
    )
    payload = trust.TrustChain((forged,)).encode()
    assert refused_without_change(device, payload, TRUST_TOPIC, T0) == "trust.signer"
    assert refused_without_change(device, b"\xa0", TRUST_TOPIC, T0) == "trust.malformed"
    assert device.trust.seq == 0 and state_bytes(device) == before
    (body,) = service.bodies("dev-a", device.report(T0 + 1))
    assert isinstance(body, KeyStateReport)
    assert dict(body.refused) == {"trust.approval": 1, "trust.signer": 1, "trust.malformed": 1}
    assert body.trust_seq is None
    # with the two admins' approval the real key's link is taken
    good = trust.TrustLink(
        alone.bundle, rotate_authz(bundle.encode(), approvers=("op-root", "op-root2"))
    )
    assert device.handle(trust.TrustChain((good,)).encode(), TRUST_TOPIC, T0 + 2).changed

"""Issue 8, found by the load run (tests/reliability/test_load_fleet.py): a re-welcome that never
completed. The service re-sends ``svc.key_package_request`` under the same command id every
commit timeout while it has not processed the device's answer yet (a busy service); the device
used to make a fresh key package per request and keep only the last eight, and the service takes
the FIRST answer. With nine or more requests the key package the service used was gone from the
device, its welcome refused (``mls.welcome.recipient``) and the device never rejoined.

Now a re-sent request is answered with the same key package. Pure: the agent core with software
keys and the test's service (tests/pure/test_agent_core.py), no I/O.
"""

from __future__ import annotations

import os

import pytest

from agent.core import MAX_KEY_PACKAGES, AgentCore
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.group import CommitMessage, KeyPackageMessage, WelcomeMessage
from agent.protocol.wire.messages.service import CommitAction, KeyPackageRequest, WelcomeDelivery
from tests.device_certs import devid_cert_der
from tests.operator_certs import membership
from tests.pure.test_agent_core import FakeService, FakeSoftwareKeys, G, acks

pytestmark = pytest.mark.pure


def test_retried_key_package_request_gets_the_same_key_package_and_the_welcome_opens() -> None:
    service = FakeService()
    service.core("dev-a")
    joiner = service.core("dev-b")
    service.create("dev-a")
    command_id = os.urandom(16)
    answers = []
    for _ in range(MAX_KEY_PACKAGES + 3):  # the service's retries, all queued at the device
        outcome = service.deliver("dev-b", KeyPackageRequest(command_id))  # a new envelope
        assert outcome.refused is None
        (body,) = service.bodies("dev-b", outcome)
        assert isinstance(body, KeyPackageMessage) and body.command_id == command_id
        answers.append(body.key_package)
    assert len(set(answers)) == 1  # one key package, not eleven
    assert joiner.status()["key_packages_outstanding"] == 1

    # the service takes the first answer; the device can open the welcome made for it
    commit, welcome = service.request_commit(
        "dev-a", CommitAction.ADD, member="dev-b", key_package=answers[0]
    )
    assert isinstance(commit, CommitMessage) and isinstance(welcome, WelcomeMessage)
    acks(service, service.fan_out(service.order(commit), ["dev-a"]))
    joined = service.deliver("dev-b", WelcomeDelivery(G, welcome.epoch, welcome.welcome))
    assert isinstance(acks(service, {"dev-b": joined})["dev-b"], Ack)
    assert joiner.epoch(G) == welcome.epoch


def test_the_request_to_key_package_link_survives_a_restart() -> None:
    service = FakeService()
    keys = FakeSoftwareKeys()
    credential = devid_cert_der("dev-b", keys.devid)
    device = AgentCore(
        "dev-b",
        service.key.public_key(),
        keys,
        credential=credential,
        membership=membership(),
        now=service.now,
    )
    service.devices["dev-b"] = device
    command_id = os.urandom(16)
    first = service.bodies("dev-b", service.deliver("dev-b", KeyPackageRequest(command_id)))
    restarted = AgentCore(
        "dev-b",
        service.key.public_key(),
        keys,
        credential=credential,
        membership=membership(),
        now=service.now,
    )
    restarted.restore(device.to_state())
    service.devices["dev-b"] = restarted
    again = service.bodies("dev-b", service.deliver("dev-b", KeyPackageRequest(command_id)))
    other = service.bodies("dev-b", service.deliver("dev-b", KeyPackageRequest(os.urandom(16))))
    assert isinstance(first[0], KeyPackageMessage) and isinstance(again[0], KeyPackageMessage)
    assert isinstance(other[0], KeyPackageMessage)
    assert again[0].key_package == first[0].key_package
    assert other[0].key_package != first[0].key_package  # a new request, a new key package

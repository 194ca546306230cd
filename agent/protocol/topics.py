"""MQTT topic names and the service's identity: the one place they are defined.

Every party (agent, service, operator CLI, simulator, broker ACL template) builds its topics here,
so a change of layout is one edit. Layout (docs/mqtt.md), under ``kf/v1/``: ``dev/{device}/cmd``
(service -> device), ``dev/{device}/report`` (device -> service), ``grp/{group}/commit`` (ordered
group handshake messages), ``ops/{operator}/cmd``, ``ops/{operator}/result`` and
``feed/revocations`` (the revocation feed's signed head, retained; every device reads it) and
``feed/releases`` (the signed release bundle, retained; every device reads it). The
service subscribes through shared subscriptions so several instances split the load.
"""

from __future__ import annotations

from typing import Final

SERVICE_ID: Final = "keyfleet-service"
"""The fleet service's name: envelope sender/recipient, MQTT client identity (certificate CN)."""

TOPIC_ROOT: Final = "kf/v1"
SHARE_GROUP: Final = "keyfleet"

REPORT_SUBSCRIPTION: Final = f"$share/{SHARE_GROUP}/{TOPIC_ROOT}/dev/+/report"
OPS_SUBSCRIPTION: Final = f"$share/{SHARE_GROUP}/{TOPIC_ROOT}/ops/+/cmd"
ALL_GROUP_COMMITS: Final = f"{TOPIC_ROOT}/grp/+/commit"
"""What a device subscribes to besides its command topic (the ACL lets it read every group's
commits; it keeps those of its own groups)."""
REVOCATION_FEED_TOPIC: Final = f"{TOPIC_ROOT}/feed/revocations"
"""The revocation feed's signed head, retained by the broker: every device subscribes to it,
only the service publishes to it (docs/wire.md, "Revocation feed")."""
RELEASES_TOPIC: Final = f"{TOPIC_ROOT}/feed/releases"
"""The release bundle (signed PCR policies of the approved firmware releases), retained by the
broker: every device subscribes to it, only the service publishes to it (docs/releases.md)."""
TRUST_TOPIC: Final = f"{TOPIC_ROOT}/feed/trust"
"""The chain of trust bundles (service signing key rollovers), retained by the broker: every
device subscribes to it, only the service publishes to it (docs/trust.md). Not an envelope: each
link is signed by a key of the bundle before it, so a device that missed a rollover can still
read it."""
FEED_RECIPIENT: Final = "keyfleet-devices"
"""The ``to`` of the retained feed head: every device (a catch-up page names the device)."""


def device_cmd_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/dev/{device_id}/cmd"


def device_report_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/dev/{device_id}/report"


def group_commit_topic(group_id: str) -> str:
    return f"{TOPIC_ROOT}/grp/{group_id}/commit"


def operator_cmd_topic(operator: str) -> str:
    return f"{TOPIC_ROOT}/ops/{operator}/cmd"


def operator_result_topic(operator: str) -> str:
    return f"{TOPIC_ROOT}/ops/{operator}/result"


def report_sender(topic: str) -> str | None:
    """The device of a ``kf/v1/dev/<device>/report`` topic, else None."""
    parts = topic.split("/")
    if len(parts) == 5 and f"{parts[0]}/{parts[1]}" == TOPIC_ROOT and parts[2] == "dev":
        return parts[3] if parts[4] == "report" and parts[3] else None
    return None


def group_of_commit_topic(topic: str) -> str | None:
    """The group of a ``kf/v1/grp/<group>/commit`` topic, else None."""
    parts = topic.split("/")
    if len(parts) == 5 and f"{parts[0]}/{parts[1]}" == TOPIC_ROOT and parts[2] == "grp":
        return parts[3] if parts[4] == "commit" and parts[3] else None
    return None

"""The map from envelope ``type`` strings to body classes."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from agent.protocol.errors import ProtocolError
from agent.protocol.wire.messages.ack import Ack
from agent.protocol.wire.messages.attestation import AttestChallenge, AttestReport
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.feed import RevocationFeed
from agent.protocol.wire.messages.group import (
    CommitMessage,
    CommitRefused,
    GroupAdmissions,
    GroupCreated,
    KeyPackageMessage,
    TreeRequest,
    UpdateProposal,
    UpdateRequest,
    WelcomeMessage,
)
from agent.protocol.wire.messages.key_state import DeviceDestroyed, KeyStateReport
from agent.protocol.wire.messages.operator import (
    Approve,
    AttestDevice,
    AuditSync,
    GroupAdd,
    GroupCreate,
    GroupPolicy,
    ListRequests,
    Propose,
    Rekey,
    ReleaseAdd,
    Revoke,
    TagDevice,
)
from agent.protocol.wire.messages.release import (
    ReleaseBundleMessage,
    ReleaseInstall,
    RolloutAbort,
    RolloutStart,
)
from agent.protocol.wire.messages.renewal import (
    RenewAnswer,
    RenewChallenge,
    RenewIssued,
    RenewRequest,
)
from agent.protocol.wire.messages.result import (
    AuditCheckpointResult,
    OperatorResult,
    RequestsResult,
)
from agent.protocol.wire.messages.service import (
    CommitRequest,
    KeyPackageRequest,
    ReportRequest,
    TreePage,
    UpdateProposalRequest,
    WelcomeDelivery,
)

BODY_CLASSES: tuple[type[Body], ...] = (
    AttestChallenge,
    AttestReport,
    KeyStateReport,
    KeyPackageMessage,
    CommitMessage,
    WelcomeMessage,
    GroupCreated,
    Ack,
    CommitRequest,
    ReportRequest,
    KeyPackageRequest,
    WelcomeDelivery,
    Rekey,
    GroupPolicy,
    Revoke,
    GroupCreate,
    GroupAdd,
    AttestDevice,
    OperatorResult,
    UpdateRequest,
    CommitRefused,
    DeviceDestroyed,
    Propose,
    Approve,
    ListRequests,
    RequestsResult,
    ReleaseAdd,
    RevocationFeed,
    AuditSync,
    AuditCheckpointResult,
    UpdateProposalRequest,
    UpdateProposal,
    ReleaseBundleMessage,
    ReleaseInstall,
    RolloutStart,
    RolloutAbort,
    RenewRequest,
    RenewChallenge,
    RenewAnswer,
    RenewIssued,
    TagDevice,
    TreeRequest,
    GroupAdmissions,
    TreePage,
)

REGISTRY: Mapping[str, type[Body]] = MappingProxyType({cls.TYPE: cls for cls in BODY_CLASSES})


def body_class(message_type: str) -> type[Body]:
    """The body class for ``message_type``; ``envelope.type`` if there is none."""
    try:
        return REGISTRY[message_type]
    except KeyError:
        raise ProtocolError("envelope.type", "unknown message type") from None


def parse_body(message_type: str, value: object) -> Body:
    """Strictly parse a body map of ``message_type``."""
    return body_class(message_type).from_cbor_map(value)

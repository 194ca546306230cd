"""What an operator request approves (docs/authorization.md, "The service's operator ops").

``operator.add``, ``operator.remove`` and ``operator.role`` Requests name no group and no device;
their ``subject`` binds exactly the change the admins approve: deterministic CBOR
``["keyfleet operator v1", op, operator id, certificate SHA-256, role | null]``. The service
builds and executes them (``provisioning.service.operatorops``); a device reads the subject of an
``operator.remove`` its revocation feed carries (``agent.protocol.feed``) to learn which operator
certificate no longer counts. Pure: bytes in, values out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from agent.protocol import authz
from agent.protocol.errors import ProtocolError
from agent.protocol.wire import cbor as codec

SUBJECT_LABEL: Final = "keyfleet operator v1"


@dataclass(frozen=True)
class OperatorSubject:
    """What an operator request binds: the op, the operator, a certificate's SHA-256 (the
    certificate to add, or the one the operator holds) and, for ``operator.role``, the role."""

    op: str
    operator: str
    cert_sha256: bytes
    role: str | None = None

    def encode(self) -> bytes:
        return codec.encode([SUBJECT_LABEL, self.op, self.operator, self.cert_sha256, self.role])

    @classmethod
    def decode(cls, data: bytes) -> OperatorSubject:
        """Raises ``operator.subject`` unless ``data`` is an operator subject."""
        try:
            decoded = codec.decode(data, max_size=authz.MAX_SUBJECT)
        except ProtocolError:
            decoded = None
        if (
            not isinstance(decoded, list)
            or len(decoded) != 5
            or decoded[0] != SUBJECT_LABEL
            or decoded[1] not in authz.OPERATOR_OPS
            or type(decoded[2]) is not str
            or type(decoded[3]) is not bytes
            or len(decoded[3]) != hashlib.sha256().digest_size
            or not (decoded[4] is None or type(decoded[4]) is str)
            or (decoded[4] is None) != (decoded[1] != authz.OP_OPERATOR_ROLE)
        ):
            raise ProtocolError("operator.subject", "not an operator subject")
        return cls(decoded[1], decoded[2], decoded[3], decoded[4])

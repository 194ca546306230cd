"""What the agent's core keeps of the fleet's releases: the release key, the newest release
bundle it verified, and the release it booted (sans-I/O; the daemon keeps the bundle on disk and
re-seals the state key, ``agent.releasestate``).

The service publishes the bundle retained on ``RELEASES_TOPIC`` inside a service-signed
``release.bundle`` message addressed to every device (like the revocation feed's head). A device
checks the envelope as any service message (but without the replay guard and the age bound: a
retained bundle may be old, its ``seq`` refuses an older one), then the bundle itself with the
release key (``agent.protocol.release.open_bundle``: ``release.signature``, ``release.policy``,
``release.malformed``), then that it is newer than the one held (``release.stale``), then that
the operators approved every release in it (``agent.protocol.releaseproof.check_bundle``:
``release.approval``). A bundle with one entry that fails is refused whole: the release key
signed an entry no quorum approved, which only a rogue signer does; the held bundle stays, the
refusal is counted and reported. The bundle held already, delivered again after a reconnect, is
no refusal.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.errors import ProtocolError
from agent.protocol.release import ReleaseBundle, check_newer, open_bundle
from agent.protocol.releaseproof import ApprovalCheck, check_bundle
from agent.protocol.topics import FEED_RECIPIENT
from agent.protocol.wire.envelope import DEFAULT_MAX_FUTURE, KeyResolver, open_message
from agent.protocol.wire.messages.release import ReleaseBundleMessage


class ReleaseFollower:
    """The release key, the operators' approval check, the newest bundle held and the release
    this boot matched."""

    def __init__(
        self,
        key: ec.EllipticCurvePublicKey,
        approval: ApprovalCheck,
        held: ReleaseBundle | None = None,
        version: str | None = None,
    ) -> None:
        self.key = key
        self.approval = approval
        self.held = held
        self.version = version

    def __repr__(self) -> str:
        seq = None if self.held is None else self.held.seq
        return f"ReleaseFollower(seq={seq}, version={self.version!r})"

    def receive(
        self, payload: bytes, resolver: KeyResolver, now: int
    ) -> tuple[ReleaseBundle, bytes] | None:
        """Open a retained ``release.bundle`` message: (bundle, its release-signed bytes) when
        it is newer than the one held (which it then becomes), None when it is the one held.
        ``ProtocolError`` otherwise; nothing changes then."""
        message = open_message(
            payload,
            resolver,
            now=now,
            recipients={FEED_RECIPIENT},
            max_age=now + 1,
            max_future=DEFAULT_MAX_FUTURE,
        )
        body = message.body
        if not isinstance(body, ReleaseBundleMessage):
            raise ProtocolError(
                "release.malformed", f"a {message.type} message on the releases topic"
            )
        bundle = open_bundle(body.bundle, self.key)
        if bundle == self.held:
            return None
        check_newer(self.held, bundle)
        check_bundle(bundle, self.held, self.approval)
        self.held = bundle
        return bundle, body.bundle

    def approved(self, version: str) -> bool:
        """``version`` is a release of the verified bundle held (its approval checked)."""
        return self.held is not None and self.held.version(version) is not None

    def status(self) -> dict[str, object]:
        held = self.held
        return {
            "bundle_seq": None if held is None else held.seq,
            "generation": None if held is None else held.generation,
            "version": self.version,
        }

"""Firmware releases approved under the quorum; the golden policy is the approved set
(docs/operations.md, "Releases"; docs/attestation.md, "The golden policy").

- ``on_add`` / ``add_release``: a proposed release from a validated manifest (``keyfleet
  release add``, the signed ``op.release_add``; audited ``release.add``). A proposed release is
  trusted by nothing.
- ``release.approve`` / ``release.revoke``: quorum requests (``provisioning.service.requests``)
  whose Request ``subject`` binds the exact release, its version and the SHA-256 of its
  canonical manifest (``agent.protocol.releaseproof.subject``). When the quorum is met the service
  verifies the Authorization, checks the subject against the row again and keeps the
  Authorization bytes on the row (``execute``); the release state's ``seq`` advances (and, on
  revocation, its ``generation``).
- ``golden``: the golden policy attestation checks, built from the approved releases and cached
  by the release state's ``seq``: one cheap read per use, so every instance enforces an
  approval made on another at its next challenge or report, without a restart. Each approved
  row is **verified again** when the policy is built (``verified_approved``): its manifest
  must hash to the approved digest and replay to its stored PCR values, and its approval must
  be an Authorization of op ``release.approve`` for exactly this release meeting the quorum
  policy it was approved under; a row imported from ``[attestation] golden_measurements`` must
  be covered by that file. A row that fails is left out and logged with
  ``release.stored`` (a database writer cannot approve a release).
- ``import_initial``: on a first start with no release rows, the releases of
  ``[attestation] golden_measurements`` become approved releases (``release.import``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sqlalchemy.orm import Session

from agent.protocol import authz, releaseproof
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.release import sign_bundle
from agent.protocol.releaseproof import ReleaseProof
from agent.protocol.topics import FEED_RECIPIENT, RELEASES_TOPIC, operator_result_topic
from agent.protocol.wire.messages.operator import ReleaseAdd
from agent.protocol.wire.messages.release import ReleaseBundleMessage
from agent.protocol.wire.messages.result import OperatorResult, ResultStatus
from provisioning import audit
from provisioning import releases as model
from provisioning.policy import GoldenPolicy
from provisioning.registry import Outcome
from provisioning.service.context import Call, Env
from provisioning.service.effects import Effects, Log, Send
from provisioning.service.model import ReleaseCache
from provisioning.service.store import quorum
from provisioning.service.store import releases as rows
from provisioning.service.store.releases import ReleaseState, Source, StoredRelease

log = logging.getLogger("keyfleet.service")

STORED = "release.stored"


# -- add ----------------------------------------------------------------------------------------


def add_release(
    session: Session, manifest: model.Manifest, *, by: str, actor: str, now: int
) -> StoredRelease:
    """A proposed release (``release.exists`` if the version is known already)."""
    if rows.load_release(session, manifest.version) is not None:
        raise ProtocolError("release.exists", f"release {manifest.version} exists already")
    stored = StoredRelease(
        version=manifest.version,
        manifest=manifest.canonical,
        manifest_sha256=manifest.sha256,
        pcrs=model.encode_pcrs(model.expected_pcrs(manifest)),
        state=ReleaseState.PROPOSED,
        source=Source.OPERATOR,
        proposed_by=by,
        proposed_at=now,
    )
    rows.insert_release(session, stored)
    audit.append(
        session,
        now=now,
        actor=actor,
        action="release.add",
        target=manifest.version,
        outcome=Outcome.ACCEPTED,
        details={
            "manifest_sha256": manifest.sha256.hex(),
            "components": ",".join(f"{c.name}={c.version}" for c in manifest.components),
        },
    )
    return stored


def on_add(session: Session, body: ReleaseAdd, *, operator: str, now: int) -> Effects:
    """``op.release_add``: validate the manifest (``release.manifest``) and keep the release
    proposed; the answer names its manifest digest, which the approvers will see."""
    try:
        manifest = model.parse_manifest(body.manifest, "manifest")
    except ConfigError as exc:
        raise ProtocolError("release.manifest", str(exc)) from None
    add_release(session, manifest, by=operator, actor=f"operator:{operator}", now=now)
    detail = (
        f"release {manifest.version} proposed (manifest SHA-256 {manifest.sha256.hex()}); "
        f"approve it with: keyfleet release approve {manifest.version}"
    )
    return [
        Log(logging.INFO, "%s proposed release %s", (operator, manifest.version)),
        Send(
            operator_result_topic(operator),
            OperatorResult.of(body.command_id, ResultStatus.DONE, detail),
            operator,
        ),
    ]


# -- requests -----------------------------------------------------------------------------------


def request_subject(session: Session, op: str, version: str) -> bytes:
    """The subject of a new ``release.approve``/``release.revoke`` request for ``version``;
    raises unless the release is in a state the op applies to."""
    stored = rows.load_release(session, version)
    if stored is None:
        raise ProtocolError("release.unknown", f"no release {version}")
    wanted = ReleaseState.PROPOSED if op == authz.OP_RELEASE_APPROVE else ReleaseState.APPROVED
    if stored.state is not wanted:
        raise ProtocolError(
            "release.state", f"release {version} is {stored.state.value}, not {wanted.value}"
        )
    checked_manifest(stored)
    return releaseproof.subject(stored.version, stored.manifest_sha256)


def execute(
    cx: Call,
    session: Session,
    verified: authz.VerifiedAuthorization,
    authorization: bytes,
    *,
    policy_serial: int,
    approvers: list[str],
    operator: str,
    now: int,
) -> Effects:
    """The quorum approved (or revoked) a release: check the subject against the row again,
    keep the Authorization on it and advance the release state."""
    request = verified.request
    assert request.subject is not None
    version, digest = releaseproof.read_subject(request.subject)
    stored = rows.load_release(session, version)
    if stored is None:
        raise ProtocolError("release.unknown", f"no release {version}")
    if stored.manifest_sha256 != digest:
        raise ProtocolError(
            "release.subject", f"release {version}: its manifest is not the one approved"
        )
    checked_manifest(stored)
    who = ",".join(approvers)
    if request.op == authz.OP_RELEASE_APPROVE:
        if stored.state is not ReleaseState.PROPOSED:
            raise ProtocolError("release.state", f"release {version} is {stored.state.value}")
        stored.state = ReleaseState.APPROVED
        stored.approval, stored.approval_serial = authorization, policy_serial
        stored.approved_by, stored.approved_at = who, now
        action = "release.approve"
    else:
        if stored.state is not ReleaseState.APPROVED:
            raise ProtocolError("release.state", f"release {version} is {stored.state.value}")
        stored.state = ReleaseState.REVOKED
        stored.revocation, stored.revocation_serial = authorization, policy_serial
        stored.ended_by, stored.ended_at = who, now
        action = "release.revoke"
    rows.save_release(session, stored)
    if action == "release.approve":
        supersede(session, stored.version, now)
    state = rows.advance(session, bump_generation=action == "release.revoke", now=now)
    audit.append(
        session,
        now=now,
        actor=f"operator:{operator}",
        action=action,
        target=version,
        outcome=Outcome.ACCEPTED,
        details={
            "approvers": who,
            "manifest_sha256": digest.hex(),
            "seq": state.seq,
            "generation": state.generation,
        },
    )
    return [
        Log(logging.INFO, "%s of release %s by %s", (action, version, who)),
        *publish(cx, session, now),
    ]


def supersede(session: Session, version: str, now: int) -> None:
    """The releases approved before ``version`` are superseded now: their grace starts."""
    for older in rows.releases_in(session, ReleaseState.APPROVED):
        if older.version != version and older.superseded_at is None:
            older.superseded_at = now
            rows.save_release(session, older)


def expire_tick(cx: Call, now: int) -> Effects:
    """Superseded releases past the grace expire: one generation bump for all of them, the
    bundle re-signed (one ``release.expire`` entry each)."""
    cutoff = now - cx.env.settings.release_grace

    def due(session: Session) -> list[StoredRelease]:
        approved = rows.releases_in(session, ReleaseState.APPROVED)
        if all(r.superseded_at is not None for r in approved):
            return []  # the release that superseded them was revoked: nothing replaces them
        return [r for r in approved if r.superseded_at is not None and r.superseded_at <= cutoff]

    def work(session: Session) -> Effects:
        expired = due(session)
        if not expired:
            return []
        for stored in expired:
            stored.state, stored.ended_by, stored.ended_at = ReleaseState.EXPIRED, "grace", now
            rows.save_release(session, stored)
        state = rows.advance(session, bump_generation=True, now=now)
        for stored in expired:
            audit.append(
                session,
                now=now,
                actor="service",
                action="release.expire",
                target=stored.version,
                outcome=Outcome.ACCEPTED,
                details={
                    "superseded_at": stored.superseded_at,
                    "seq": state.seq,
                    "generation": state.generation,
                },
            )
        names = ", ".join(s.version for s in expired)
        return [Log(logging.INFO, "releases %s expired", (names,)), *publish(cx, session, now)]

    return cx.env.tx(work) if cx.env.read(lambda s: bool(due(s))) else []


# -- the signed bundle --------------------------------------------------------------------------


def publish(cx: Call, session: Session, now: int) -> Effects:
    """Sign the bundle of the release state as it now is (verified approved releases only, each
    with its manifest and the operators' Authorization, which devices check: an imported release
    has none), store it and publish it retained; nothing without ``[releases] signing_key``."""
    env = cx.env
    if env.release_key is None:
        if not env.release_key_warned:
            env.release_key_warned = True
            return [
                Log(
                    logging.WARNING,
                    "no [releases] signing_key: the release bundle is not published",
                    (),
                )
            ]
        return []
    state = rows.release_state(session)
    good, refused = verified_approved(env, session)
    effects: Effects = [
        Log(logging.ERROR, "release refused: [%s] %s", (exc.check, exc.reason)) for exc in refused
    ]
    ended = [
        r.version
        for r in rows.all_releases(session)
        if r.state in (ReleaseState.REVOKED, ReleaseState.EXPIRED)
    ]
    bundle = sign_bundle(
        seq=state.seq,
        generation=state.generation,
        time=now,
        releases=[(s.version, model.expected_pcrs(m)) for s, m in good],
        revoked=ended,
        key=env.release_key,
        proofs={
            s.version: ReleaseProof(s.manifest, s.approval)
            for s, _ in good
            if s.approval is not None
        },
    )
    rows.store_bundle(session, state.seq, bundle)
    audit.append(
        session,
        now=now,
        actor="service",
        action="release.bundle",
        target=str(state.seq),
        outcome=Outcome.ACCEPTED,
        details={
            "generation": state.generation,
            "releases": ",".join(s.version for s, _ in good),
            "revoked": ",".join(ended),
        },
    )
    return [*effects, Send(RELEASES_TOPIC, ReleaseBundleMessage(bundle), FEED_RECIPIENT)]


def current_bundle(cx: Call, session: Session, now: int) -> Effects:
    """What to publish retained at start: the stored bundle, or one signed now (the release
    state has none yet: the first start after the import, or the key was just configured)."""
    state = rows.release_state(session)
    if state.bundle is not None:
        return [Send(RELEASES_TOPIC, ReleaseBundleMessage(state.bundle), FEED_RECIPIENT)]
    if state.seq == 0:
        return []
    return publish(cx, session, now)


# -- verification of stored rows ---------------------------------------------------------------


def checked_manifest(stored: StoredRelease) -> model.Manifest:
    """The row's manifest, if its bytes are canonical, hash to its digest and replay to its
    stored PCR values; ``release.stored`` otherwise."""
    try:
        manifest = model.parse_manifest(stored.manifest, f"release {stored.version}")
    except ConfigError as exc:
        raise ProtocolError(STORED, str(exc)) from None
    if (
        manifest.version != stored.version
        or manifest.canonical != stored.manifest
        or manifest.sha256 != stored.manifest_sha256
        or model.expected_pcrs(manifest) != model.decode_pcrs(stored.pcrs)
    ):
        raise ProtocolError(
            STORED, f"release {stored.version}: its row disagrees with its manifest"
        )
    return manifest


def policies_by_serial(env: Env, session: Session) -> dict[int, authz.QuorumPolicy]:
    """Every quorum policy that was in force, by serial, each verified under the one before."""
    policy = authz.QuorumPolicy.initial(env.settings.min_approvals)
    found = {policy.serial: policy}
    for _serial, stored in quorum.adopted_policies(session):
        policy = env.approvals().verify_policy_update(stored, current=policy, now=None)
        found[policy.serial] = policy
    return found


def verify_approved(
    env: Env,
    stored: StoredRelease,
    policies: dict[int, authz.QuorumPolicy],
) -> model.Manifest:
    """The manifest of an approved row, once its approval verified; ``release.stored``."""
    manifest = checked_manifest(stored)
    if stored.source is Source.IMPORT:
        initial = env.attestation.policy if env.attestation is not None else None
        if (
            stored.approval is not None
            or initial is None
            or not model.covered_by(manifest, initial)
        ):
            raise ProtocolError(
                STORED,
                f"release {stored.version} claims an import that [attestation] "
                "golden_measurements does not hold",
            )
        return manifest
    if stored.approval is None or stored.approval_serial not in policies:
        raise ProtocolError(STORED, f"release {stored.version} is approved without a quorum")
    approvals = env.approvals()
    try:
        verified = approvals.verify(
            stored.approval,
            policy=policies[stored.approval_serial],
            now=None,
            op=authz.OP_RELEASE_APPROVE,
            group=None,
        )
        assert verified.request.subject is not None
        subject = releaseproof.read_subject(verified.request.subject)
    except ProtocolError as exc:
        raise ProtocolError(
            STORED, f"release {stored.version}: its approval does not verify ({exc.check})"
        ) from None
    if subject != (stored.version, stored.manifest_sha256):
        raise ProtocolError(STORED, f"release {stored.version}: approved for another release")
    return manifest


def verified_approved(
    env: Env, session: Session
) -> tuple[list[tuple[StoredRelease, model.Manifest]], list[ProtocolError]]:
    """The approved releases whose approval verifies, and the refusals of the others."""
    policies = policies_by_serial(env, session)
    good: list[tuple[StoredRelease, model.Manifest]] = []
    refused: list[ProtocolError] = []
    for stored in rows.releases_in(session, ReleaseState.APPROVED):
        try:
            good.append((stored, verify_approved(env, stored, policies)))
        except ProtocolError as exc:
            refused.append(exc)
    return good, refused


# -- the golden policy --------------------------------------------------------------------------


def golden(cx: Call, session: Session) -> GoldenPolicy:
    """The golden policy in force: the approved releases (re-read when the release state's seq
    moved), or the configured file before any release exists."""
    env = cx.env
    assert env.attestation is not None
    seq = rows.release_seq(session)
    if seq == 0:
        return env.attestation.policy
    cached = env.releases
    if cached is not None and cached.seq == seq:
        return cached.policy
    good, refused = verified_approved(env, session)
    for exc in refused:
        log.error("release refused: [%s] %s", exc.check, exc.reason)
    policy = GoldenPolicy({})
    expected: list[tuple[str, Mapping[int, bytes]]] = []
    for stored, manifest in sorted(good, key=lambda g: (g[0].approved_at or 0, g[0].version)):
        try:
            policy = policy.approve(manifest.components)
        except ConfigError as exc:
            log.error("release %s left out of the golden policy: %s", stored.version, exc)
            continue
        expected.append((stored.version, model.expected_pcrs(manifest)))
    env.releases = ReleaseCache(seq, policy, tuple(expected))
    versions = ", ".join(v for v, _ in expected) or "none"
    log.info("golden policy at release seq %d: %s", seq, versions)
    return policy


def matched_release(cx: Call, pcr_values: Mapping[int, bytes]) -> str | None:
    """The newest approved release whose expected PCR values a trusted quote showed (after
    ``golden`` built the cache of this call), None if none (a mix of components)."""
    cached = cx.env.releases
    return None if cached is None else cached.match(pcr_values)


def record_device(
    cx: Call, session: Session, device_id: str, pcr_values: Mapping[int, bytes], now: int
) -> None:
    """Remember which release a trusted device runs (``release list``, expiry)."""
    rows.record_device_release(session, device_id, matched_release(cx, pcr_values), now)


def devices_by_release(session: Session) -> dict[str, list[str]]:
    """Release version -> the devices whose latest trusted attestation matched it."""
    found: dict[str, list[str]] = {}
    for device_id, version, _at in rows.device_releases(session):
        if version is not None:
            found.setdefault(version, []).append(device_id)
    return found


def import_initial(cx: Call, now: int) -> None:
    """First start with an empty releases table: import the configured golden policy's
    releases as approved (one ``release.import`` entry each)."""
    env = cx.env
    if env.attestation is None:
        return
    configured = env.attestation.policy

    def work(session: Session) -> list[str]:
        if rows.count_releases(session) or rows.release_state(session).seq:
            return []
        imported = []
        for manifest in model.from_policy(configured):
            rows.insert_release(
                session,
                StoredRelease(
                    version=manifest.version,
                    manifest=manifest.canonical,
                    manifest_sha256=manifest.sha256,
                    pcrs=model.encode_pcrs(model.expected_pcrs(manifest)),
                    state=ReleaseState.APPROVED,
                    source=Source.IMPORT,
                    proposed_by="service",
                    proposed_at=now,
                    approved_by="import",
                    approved_at=now,
                ),
            )
            audit.append(
                session,
                now=now,
                actor="service",
                action="release.import",
                target=manifest.version,
                outcome=Outcome.ACCEPTED,
                details={"manifest_sha256": manifest.sha256.hex()},
            )
            imported.append(manifest.version)
        if imported:
            rows.advance(session, bump_generation=False, now=now)
        return imported

    if env.read(lambda s: rows.count_releases(s) == 0):
        imported = env.tx(work)
        if imported:
            log.info("imported releases %s from the golden measurements", ", ".join(imported))

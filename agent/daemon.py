"""``keyagent run``: the device daemon. Adapters around ``agent.core.AgentCore``: the TPM (DevID,
leaf keys, the sealed state key), the encrypted state file, MQTT, the local API and sd_notify.

Threads: paho's I/O thread (inside ``MqttClient``, queue mode: it only enqueues), the local API
server's selector thread, and this module's worker (the main thread), which owns the core. The
core and the TPM connection are shared with the local API through one lock.

Crash safety, in the order the worker does things for every inbound message:
``core.handle`` -> save the state file (atomic) -> publish the answers (QoS 1) -> PUBACK the
inbound message (``manual_ack``). A kill at any point leaves either the old state (the message
is redelivered and processed again) or the new one (the redelivery is a ``replay.duplicate`` and
the same answers go out again, byte for byte). Leaf key blobs are written before the state that
refers to them and shredded only after a state that no longer does was saved.

Size: about 1,100 lines; start-up, the worker loop, the persist-before-publish rule, the
certificate switch after a renewal (over MQTT or, once expired, HTTPS), the broker CAs a trust
bundle changes and the trust-chain subscription share this object's state. What needs none of
it lives apart (``agent.staterotation``, ``agent.releasestate``, ``agent.keybackend``,
``agent.tpm.parents``, ``agent.renewal_https``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.types import TPM2B_PUBLIC

from agent import heap, renewal_https
from agent.appseal import sealed_generations
from agent.config import AgentConfig, InstallConfig, load_config
from agent.core import (
    AgentCore,
    AttestationEvidence,
    Outcome,
    RenewalEvidence,
    RenewalSetup,
    leaf_name,
)
from agent.fsio import atomic_write, shred
from agent.keybackend import TpmKeyBackend
from agent.localapi.server import LocalApiServer
from agent.mqtt import MqttClient, ReceivedMessage
from agent.protocol.credentials import leaf_qualifying_data, tpm_proof_from_certify
from agent.protocol.errors import (
    ConfigError,
    KeyfleetError,
    ProtocolError,
    StateError,
    TPMError,
    TransportError,
)
from agent.protocol.hpke import serialize_public_key
from agent.protocol.initkeys import init_key_name
from agent.protocol.lifecycle import KeyKind, KeyLedger, KeyState
from agent.protocol.renewal import RenewalSchedule, sign_tls_proof
from agent.protocol.topics import (
    ALL_GROUP_COMMITS,
    RELEASES_TOPIC,
    REVOCATION_FEED_TOPIC,
    TRUST_TOPIC,
)
from agent.protocol.wire.envelope import DEFAULT_MAX_AGE
from agent.protocol.wire.messages.release import ReleaseInstall
from agent.releasestate import HeldReleases
from agent.renewal_https import RenewalClient
from agent.sdnotify import Notifier
from agent.selftest import run_builtin_selftests_apart
from agent.staterotation import (
    RotationBudget,
    StateKeeper,
    destroyed_keys,
    next_state_name,
    note_erased,
    note_rotation,
)
from agent.tpm.blob import KeyBlob
from agent.tpm.parents import (
    DESTROYED_PREFIX,
    ParentRing,
    destruction_note,
    drained,
    note_evictions,
    pending_parents,
)
from agent.tpm.store import ParentEvicted, TPMKey, TPMStore
from agent.tpm.templates import KeyKind as TpmKeyKind

log = logging.getLogger("keyagent.daemon")

STATUS_FILE: Final = "status.json"
BROKER_CA_FILE: Final = "broker-cas.pem"
"""After a broker CA rollover: the broker CAs the held trust bundle accepts (docs/trust.md)."""
LEAF_DIR: Final = "leaves"
APP_SEAL_DIR: Final = "app-seal"
TICK_SECONDS: Final = 1.0
PUBLISH_TIMEOUT: Final = 5.0
_POLL: Final = 0.2
FAULT_ENV: Final = "KEYAGENT_TEST_KILL_AT"


class FaultPoints:
    """Crash-safety tests kill the agent at named points of a message exchange:
    ``KEYAGENT_TEST_KILL_AT=<point>:<message type>:<n>`` sends SIGKILL to this process the n-th
    time a message of that type reaches the point. Points: ``before-persist`` (handled in
    memory only), ``after-persist`` (state saved, nothing published), ``after-publish``
    (answers published, the inbound message not acknowledged), ``before-install`` (a
    ``release.install`` saved and acknowledged, its update hook not started), ``during-install``
    (the hook started, not finished). Unset: nothing happens."""

    POINTS: Final = (
        "before-persist",
        "after-persist",
        "after-publish",
        "before-install",
        "during-install",
    )

    def __init__(self, spec: str | None) -> None:
        self._target: tuple[str, str] | None = None
        self._left = 0
        if spec:
            point, kind, count = spec.split(":")
            if point not in self.POINTS:
                raise ConfigError(f"{FAULT_ENV}: unknown point {point!r}")
            self._target, self._left = (point, kind), int(count)
            log.warning("%s=%s: this agent will kill itself (tests only)", FAULT_ENV, spec)

    def reached(self, point: str, kind: str | None) -> None:
        if self._target != (point, kind):
            return
        self._left -= 1
        if self._left == 0:
            log.warning("fault injection: SIGKILL at %s of %s", point, kind)
            os.kill(os.getpid(), signal.SIGKILL)


# -- the update hook (staged rollouts) -----------------------------------------------------------

HOOK_OUTPUT_SHOWN: Final = 300


def run_install_hook(
    config: InstallConfig, version: str, *, started: Callable[[], None] = lambda: None
) -> ProtocolError | None:
    """Run the update hook for ``version`` (no shell, its own session so that it outlives the
    agent, which the reboot it may start stops) and wait up to ``config.timeout``. None: it
    exited 0; else why not (``release.install.failed``, ``release.install.timeout``)."""
    # imported here: subprocess (with selectors) costs every agent about 0.3 MB of resident
    # memory, for a hook that runs only when a release is installed
    import subprocess  # noqa: PLC0415

    argv = config.argv(version)
    try:
        hook = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return ProtocolError("release.install.failed", f"cannot run {argv[0]}: {exc.strerror}")
    started()
    try:
        output, _ = hook.communicate(timeout=config.timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(hook.pid, signal.SIGKILL)
        hook.communicate()
        return ProtocolError(
            "release.install.timeout", f"{argv[0]} did not finish within {config.timeout} s"
        )
    if hook.returncode != 0:
        tail = output.decode("utf-8", "replace").strip()[-HOOK_OUTPUT_SHOWN:]
        return ProtocolError(
            "release.install.failed", f"{argv[0]} exited with {hook.returncode}: {tail}"
        )
    return None


# -- keys --------------------------------------------------------------------------------------


def leaf_file(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:32] + ".pem"


class TpmKeys:
    """``agent.core.KeyProvider`` over the TPM: the DevID key, and leaf keys whose blobs live in
    ``<state dir>/leaves/`` named by a hash of their public key. ``ak_blob``: the enrolled AK's
    blob (``identity.ak_key``), which certifies leaf keys for ``prove_leaf``. Leaf and init keys
    are made under the current rotating parent (``agent.tpm.parents``), which ``settle``
    rotates and evicts after each saved state."""

    def __init__(
        self,
        store: TPMStore,
        devid: ec.EllipticCurvePrivateKey,
        leaf_dir: Path,
        ak_blob: Path | None = None,
    ) -> None:
        self._store = store
        self._devid = devid
        self._dir = leaf_dir
        self._ak_blob = ak_blob
        self._loaded: dict[bytes, TPMKey] = {}
        self.parents = ParentRing(store)
        leaf_dir.mkdir(mode=0o700, exist_ok=True)

    def __repr__(self) -> str:
        return f"TpmKeys({len(self._loaded)} leaves loaded)"

    @property
    def devid(self) -> ec.EllipticCurvePrivateKey:
        return self._devid

    def new_leaf_key(self) -> ec.EllipticCurvePrivateKey:
        blob = self._store.create_key(TpmKeyKind.LEAF, parent=self.parents.ensure())
        key = self._store.load_key(blob)
        public = serialize_public_key(key.public_key())
        try:
            blob.save(self._dir / leaf_file(public))  # durable before any state refers to it
        except StateError:
            key.close()  # not kept: flush it now rather than leave it loaded in the TPM
            raise
        self._loaded[public] = key
        return key

    def load_leaf(self, public: bytes) -> ec.EllipticCurvePrivateKey:
        return self._leaf(public)

    def _leaf(self, public: bytes) -> TPMKey:
        key = self._loaded.get(public)
        if key is not None:
            return key
        path = self._dir / leaf_file(public)
        if not path.exists():
            raise StateError(f"leaf key blob {path.name} is missing")
        try:
            key = self._store.load_key(KeyBlob.load(path))
        except ParentEvicted as exc:
            raise StateError(
                f"leaf key blob {path.name} does not load [{exc.check}]: {exc.detail}"
            ) from None
        except TPMError as exc:
            raise StateError(f"leaf key blob {path.name} does not load: {exc}") from None
        if serialize_public_key(key.public_key()) != public:
            key.close()
            raise StateError(f"leaf key blob {path.name} holds another key")
        self._loaded[public] = key
        return key

    def prove_leaf(self, public_point: bytes) -> bytes | None:
        """TPM2_Certify of the leaf key by the AK, qualified by SHA-256 of its point, as a
        residency proof (``agent.protocol.credentials``). The AK is loaded for the one command
        and flushed. None when the configuration names no AK."""
        if self._ak_blob is None:
            return None
        leaf = self._leaf(public_point)
        with self._store.load_key(KeyBlob.load(self._ak_blob)) as ak:
            attestation = self._store.certify(ak, leaf, leaf_qualifying_data(public_point))
            return tpm_proof_from_certify(ak.public_area, leaf.public_area, attestation)

    def _blobs(self) -> dict[Path, KeyBlob | None]:
        out: dict[Path, KeyBlob | None] = {}
        for path in sorted(self._dir.glob("*.pem")):
            try:
                out[path] = KeyBlob.load(path)
            except StateError:
                out[path] = None  # unreadable: under no parent anyone can use
        return out

    def note_destroyed(self, ledger: KeyLedger, live: set[bytes]) -> None:
        """Before a state without some keys is saved: the ledger records of the leaf and init
        keys about to be collected say how they are destroyed (their parent's eviction pending,
        or made under the SRK), so the note is saved with the state that drops them."""
        keep = {leaf_file(public) for public in live}
        for path, blob in self._blobs().items():
            if path.name in keep or blob is None:
                continue
            public = _blob_point(blob)
            if public is None:
                continue
            note = destruction_note(blob.parent)
            for name in (leaf_name(public), init_key_name(public)):
                if name not in ledger:
                    continue
                record = ledger.get(name)
                if record.state is KeyState.DESTROYED and not (record.note or "").startswith(
                    DESTROYED_PREFIX
                ):
                    ledger.annotate(name, note)

    def settle(
        self,
        ledger: KeyLedger,
        budget: RotationBudget,
        now: int,
        fault: Callable[[str], None] = lambda step: None,
    ) -> bool:
        """After a state was saved and ``collect`` ran: rotate the current parent if a key under
        it was destroyed (and the budget has a token), evict every other parent no blob is under,
        and note the evictions in the ledger. True if the ledger changed (save it again).
        ``fault``: crash tests kill the process after ``rotated`` and each ``evicted``."""
        ring = self.parents
        due = ring.current() in set(pending_parents(ledger).values())
        if due and budget.available(now) and ring.rotate() is not None:
            budget.spend(now)
            fault("rotated")
        present = ring.present()
        # only a parent other than the current one can be evicted: with none, no blob scan
        in_use = (
            {b.parent for b in self._blobs().values() if b is not None}
            if len(present) > 1
            else set()
        )
        for handle in drained(present, in_use):
            ring.evict(handle)
            log.info("rotating parent 0x%08x evicted: no key blob under it loads any more", handle)
            fault("evicted")
        return note_evictions(ledger, ring.present())

    def collect(self, live: set[bytes]) -> int:
        """Destroy every leaf not in ``live``: flush it from the TPM, shred its blob. Call only
        after a state without those leaves was saved."""
        keep = {leaf_file(public) for public in live}
        for public in [p for p in self._loaded if p not in live]:
            with contextlib.suppress(TPMError):
                self._loaded.pop(public).close()
        gone = 0
        for path in self._dir.glob("*.pem"):
            if path.name not in keep:
                shred(path)
                gone += 1
        return gone


def _blob_point(blob: KeyBlob) -> bytes | None:
    """The uncompressed point of a key blob's public area (no TPM command); None if the public
    area does not decode (such a blob loads nowhere and names no ledger record)."""
    try:
        public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
    except (TSS2_Exception, ValueError, TypeError):
        return None
    unique = public.publicArea.unique.ecc
    return b"\x04" + bytes(unique.x) + bytes(unique.y)


def load_devid(
    store: TPMStore | None, config: AgentConfig, allow_insecure: bool
) -> ec.EllipticCurvePrivateKey:
    """The DevID key: a TPM blob loaded into ``store``; or a software key, refused unless both
    ``simulation.insecure_software_keys`` and ``allow_insecure`` say so (the virtual fleet,
    firmware_sim.fleet, has no TPM and passes no store)."""
    assert config.identity is not None
    data = config.identity.devid_key.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----"):
        if store is None:
            raise ConfigError("identity.devid_key is a TPM key blob: it needs the device's TPM")
        return store.load_key(KeyBlob.from_pem(data))
    if not (config.simulation.insecure_software_keys and allow_insecure):
        raise ConfigError(
            "identity.devid_key is a software key: refused (simulation.insecure_software_keys "
            "and --allow-insecure-software-keys are both needed)"
        )
    log.warning("INSECURE: the DevID key is a SOFTWARE key (simulation); never on a real device")
    key = load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("identity.devid_key: the software key is not an EC key")
    return key


# -- the state key and file ----------------------------------------------------------------------


def open_state(
    store: TPMStore,
    state_dir: Path,
    pcrs: tuple[int, ...],
    release_key: ec.EllipticCurvePublicKey | None = None,
) -> StateKeeper:
    """Open the state (``agent.staterotation``): the key sealed under the PCRs and the TPM state
    counter, one unseal. If the PCRs changed, the old key blob and state file are kept aside
    (``*.sealed-elsewhere.<time>``) and the counter moves, so they stay unusable even if the old
    measurements come back; an older state put back in place is refused (``state.rollback``).
    In both cases the agent starts with empty group state and reports it. With ``[releases]
    key``: sealed for the signed releases instead (``agent.releasestate``); the older bundle
    is kept while app secrets are sealed under its generation (``agent.appseal``)."""
    releases = None if release_key is None else HeldReleases.load(state_dir, release_key)
    if releases is not None:
        app_dir = state_dir / APP_SEAL_DIR
        releases.others = lambda: sealed_generations(app_dir)
    keeper = StateKeeper(store, state_dir, pcrs, releases=releases)
    keeper.open()
    return keeper


# -- the daemon ----------------------------------------------------------------------------------


class Daemon:
    """One running agent. ``run()`` blocks until ``stop()`` (SIGTERM) and returns an exit code."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        notifier: Notifier | None = None,
        allow_insecure: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not config.provisioned:
            raise ConfigError("keyagent run needs a provisioned configuration")
        assert config.identity is not None and config.fleet is not None
        assert config.broker is not None
        self.config = config
        self.notifier = notifier if notifier is not None else Notifier()
        self.allow_insecure = allow_insecure
        self._clock = clock
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self.state_dir = config.state.dir
        self.core: AgentCore | None = None
        self._state: StateKeeper | None = None
        self._keys: TpmKeys | None = None
        self._mqtt: MqttClient | None = None
        self._api: LocalApiServer | None = None
        self._backend: TpmKeyBackend | None = None
        self._store: TPMStore | None = None
        self._faults = FaultPoints(os.environ.get(FAULT_ENV))
        self._mqtt_replaced = False  # a renewal replaced the MQTT client (run loop resubscribes)
        # [renewal] url: renewal over HTTPS once the certificates expired (_renew_expired)
        self._renewal_client: RenewalClient | None = None
        self._mqtt_cas: bytes | None = None  # the broker CAs (PEM) the client was made with
        # After a failed state write (disk full): outcomes handled in memory but not saved, so
        # not published, and a message whose handling could not store a key; see _resume.
        self._held: list[tuple[Outcome, ReceivedMessage | None]] = []
        self._retry: ReceivedMessage | None = None
        self._blocked_since: float | None = None
        self._blocked_reasons: set[str] = set()
        # update hooks that ended (their thread puts them here; the worker loop reports them)
        self._installs: queue.SimpleQueue[tuple[ReleaseInstall, ProtocolError | None]] = (
            queue.SimpleQueue()
        )

    def stop(self) -> None:
        self._stop.set()

    def now(self) -> int:
        return int(self._clock())

    # -- startup ------------------------------------------------------------------------------

    def _start(self) -> None:
        config = self.config
        assert config.identity is not None and config.fleet is not None
        assert config.broker is not None
        if config.simulation.insecure_software_keys:
            log.warning("INSECURE: simulation.insecure_software_keys = true in %s", config.source)
        if not config.fleet.operator_anchors:
            log.warning(
                "no operator CA in [fleet] operator_anchors of %s: this device refuses every "
                "group membership change (create, add, remove) until one is configured",
                config.source,
            )
        ok, failed = run_builtin_selftests_apart()
        if not ok:
            raise KeyfleetError(f"self-test failed ({failed} checks): refusing to start")
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._store = store = TPMStore(config.tpm.tcti)
        devid = load_devid(store, config, self.allow_insecure)
        self._state = open_state(store, self.state_dir, config.tpm.pcrs, config.releases.key)
        self._keys = TpmKeys(
            store, devid, self.state_dir / LEAF_DIR, ak_blob=config.identity.ak_key
        )
        core = AgentCore(
            config.identity.device_id,
            config.fleet.service_key,
            self._keys,
            credential=config.identity.devid_cert.certificates[0].public_bytes(Encoding.DER),
            membership=config.fleet.membership(),
            now=self.now(),
            policy_for=config.rotation.for_group,
            max_age=max(DEFAULT_MAX_AGE, config.broker.session_expiry),
            attester=self._attest,
            can_install=config.install is not None,
            renewal=self._renewal_setup(),
        )
        saved = self._state.load()
        if saved is not None:
            core.restore(saved)
            assert self._state.state_file is not None
            log.info(
                "state resumed: generation %d, groups %s, next seq %d",
                self._state.state_file.generation,
                {name: group.epoch for name, group in core.groups().items()},
                core.next_seq,
            )
        # Continue above any seq this device may have sent from another state (milliseconds of
        # the clock, as the service does): a fresh state must never start from 1 again, and a
        # state opened again after a boot that ran without it (an unapproved image holds the
        # state, docs/releases.md) must not reuse the numbers sent meanwhile.
        core.skip_sequence_to(self.now() * 1000)
        self.core = core
        if self._state.rollback is not None:
            core.rejections.record(ProtocolError(self._state.rollback_check, self._state.rollback))
            core.report_due = self.now()
        if self._state.held is not None:
            core.rejections.record(ProtocolError("release.unapproved", self._state.held))
            core.report_due = self.now()
        if self._state.releases is not None:
            core.follow_releases(
                self._state.releases.key, self._state.releases.newest, self._state.release_version
            )
        if self._state.held is None:
            # held, the ledger is not at hand: report no key records rather than new ones
            self._note_own_keys()
        self._persist()
        self._backend = TpmKeyBackend(
            core,
            self._lock,
            signer=devid,
            sealer=store,
            seal_dir=self.state_dir / APP_SEAL_DIR,
            pcrs=config.tpm.pcrs,
            on_change=self._persist,
            clock=self._clock,
            releases=self._state.releases,
        )
        self._reseal_apps()  # a generation that arrived before a stop, or a first bundle
        self._api = LocalApiServer(
            config.api.socket,
            config.api.policy,
            self._backend,
            socket_group=config.api.socket_group,
        )
        self._api.start()
        self._mqtt = self._new_mqtt()
        self._mqtt.start()
        if config.renewal.url is not None and core.renewal is not None:
            ca = config.renewal.ca if config.renewal.ca is not None else config.broker.ca
            self._renewal_client = RenewalClient(config.renewal.url, ca=ca.path)

    def _broker_cas(self) -> bytes | None:
        """The broker CAs (PEM) the held trust bundle accepts now; None: ``[broker] ca``."""
        assert self.core is not None
        cas = self.core.trust.broker_cas(self.now())
        return None if cas is None else b"".join(c.public_bytes(Encoding.PEM) for c in cas)

    def _broker_ca_file(self) -> Path:
        """The CA file the MQTT client checks the broker's certificate with: ``[broker] ca``,
        or after a broker CA rollover the bundle's broker CAs, written atomically to the state
        directory. If that file cannot be written the configured one is used (and logged)."""
        config = self.config
        assert config.broker is not None
        cas = self._broker_cas()
        self._mqtt_cas = cas
        if cas is None:
            return config.broker.ca.path
        path = self.state_dir / BROKER_CA_FILE
        try:
            if not path.exists() or path.read_bytes() != cas:
                atomic_write(path, cas, mode=0o644)
        except (OSError, StateError) as exc:
            log.error("broker CAs of the trust bundle not written to %s: %s", path, exc)
            self._mqtt_cas = None
            return config.broker.ca.path
        return path

    def _follow_broker_cas(self) -> None:
        """A trust bundle changed the broker CAs: reconnect with a client that checks the
        broker with them (the TLS context is made once per client)."""
        if self._mqtt is None or self._broker_cas() == self._mqtt_cas:
            return
        log.info("the trust bundle changed the broker CAs: reconnecting with them")
        self._mqtt.close()
        self._mqtt = self._new_mqtt()
        self._mqtt.start()
        self._mqtt_replaced = True

    def _new_mqtt(self) -> MqttClient:
        """The MQTT client, with the TLS certificate file as it is now (renewal rewrites it)
        and the broker CAs as the held trust bundle accepts them now."""
        config = self.config
        assert config.identity is not None and config.broker is not None
        return MqttClient(
            host=config.broker.host,
            port=config.broker.port,
            ca_file=self._broker_ca_file(),
            cert_file=config.identity.tls_cert.path,
            key_file=config.identity.tls_key,
            client_id=config.identity.device_id,
            clean_start=False,
            session_expiry=config.broker.session_expiry,
            keepalive=config.broker.keepalive,
            manual_ack=True,
            timeout=PUBLISH_TIMEOUT,
        )

    # -- certificate renewal (agent.protocol.renewal) ----------------------------------------

    def _renewal_setup(self) -> RenewalSetup | None:
        """Renewal needs the AK (the TPM2_Certify of the DevID key) and ``[renewal] enabled``."""
        config = self.config
        assert config.identity is not None and config.fleet is not None
        if not config.renewal.enabled or config.identity.ak_key is None:
            if config.renewal.enabled:
                log.warning("certificate renewal needs identity.ak_key: the agent never renews")
            return None
        return RenewalSetup(
            tls_credential=config.identity.tls_cert.certificates[0].public_bytes(Encoding.DER),
            anchors=tuple(c for f in config.fleet.trust_anchors for c in f.certificates),
            schedule=RenewalSchedule(config.renewal.fraction),
            renewer=self._renew_evidence,
            over_https=config.renewal.url is not None,
        )

    def _renew_evidence(self, nonce: bytes, pcrs: tuple[int, ...]) -> RenewalEvidence:
        """A quote (as for attestation), a TPM2_Certify of the DevID key by the AK over the same
        nonce, and the TLS key's signature over it. Failures are ``agent.renew.unavailable``."""
        config = self.config
        assert config.identity is not None and config.identity.ak_key is not None
        assert self._store is not None and self._keys is not None
        devid = self._keys.devid
        if not isinstance(devid, TPMKey):
            raise ProtocolError(
                "agent.renew.unavailable", "the DevID key is not in a TPM: nothing to certify"
            )
        evidence = self._attest(nonce, pcrs)
        try:
            with self._store.load_key(KeyBlob.load(config.identity.ak_key)) as ak:
                certify = self._store.certify(ak, devid, nonce)
            tls_key = load_pem_private_key(config.identity.tls_key.read_bytes(), password=None)
        except (TPMError, StateError, OSError, ValueError) as exc:
            raise ProtocolError("agent.renew.unavailable", f"renewal proof: {exc}") from None
        if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
            raise ProtocolError("agent.renew.unavailable", "the TLS key is not an EC key")
        return RenewalEvidence(
            attestation=evidence,
            devid_public=devid.public_area,
            certify=certify.attest,
            certify_signature=certify.signature,
            tls_proof=sign_tls_proof(tls_key, config.identity.device_id, nonce),
        )

    def _take_renewed(self, devid_der: bytes, tls_der: bytes) -> None:
        """Write the renewed certificates over the configured files (each atomically: a crash
        leaves the old or the new file, both valid for the same key) and reconnect with the new
        TLS certificate."""
        config = self.config
        assert config.identity is not None and self._mqtt is not None
        for path, der in (
            (config.identity.devid_cert.path, devid_der),
            (config.identity.tls_cert.path, tls_der),
        ):
            pem = x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
            try:
                atomic_write(path, pem, mode=0o644)
            except OSError as exc:
                # the certificates are taken in memory; the files keep the old ones (still
                # valid), so the next start renews again
                log.error("renewed certificate not written to %s: %s", path, exc)
                return
        log.info("renewed certificates written; reconnecting with the new TLS certificate")
        old = self._mqtt
        old.close()
        self._mqtt = self._new_mqtt()
        self._mqtt.start()
        self._mqtt_replaced = True

    def _renew_expired(self) -> None:
        """While MQTT is down and the certificates have expired (our clock) or the broker
        refused them as expired: renew over HTTPS (``agent.renewal_https``) with the same
        envelopes and TPM proofs the core makes for MQTT (``AgentCore.expired_renewal``), at
        most as often as the renewal backoff allows; the new certificates are taken as over
        MQTT (``_take_renewed``: checked by the core, written atomically, MQTT reconnects)."""
        client, core, mqtt = self._renewal_client, self.core, self._mqtt
        if client is None or core is None or mqtt is None or mqtt.connected or self._blocked:
            return
        refused = any(
            "certificate expired" in error.lower() or "certificate_expired" in error.lower()
            for error in mqtt.recent_errors
        )
        with self._lock:
            outcome = core.expired_renewal(self.now(), refused=refused)
        if outcome is None:
            return

        def handle(envelope: bytes) -> Outcome:
            assert core is not None
            with self._lock:
                return core.handle(envelope, core.command_topic, self.now())

        try:
            taken = renewal_https.exchange(client, core.device_id, outcome, handle, self._persist)
        except (ProtocolError, TransportError, StateError) as exc:
            log.warning("renewal over HTTPS did not renew (asked again after a backoff): %s", exc)
            return
        if taken.renewed is not None:
            self._take_renewed(*taken.renewed)

    def _attest(self, nonce: bytes, pcrs: tuple[int, ...]) -> AttestationEvidence:
        """A quote by the AK (loaded for this quote only, flushed after) and the event log the
        firmware wrote at this boot. Any failure is the agent's ``agent.attest.unavailable``
        refusal: the service sees no report and its challenge times out, naming the device."""
        config = self.config
        assert config.identity is not None and self._store is not None
        ak_path, log_path = config.identity.ak_key, config.attestation.event_log
        if ak_path is None or log_path is None:
            raise ProtocolError(
                "agent.attest.unavailable",
                "attestation needs identity.ak_key and [attestation] event_log in the config",
            )
        try:
            event_log = log_path.read_bytes()
        except OSError as exc:
            raise ProtocolError(
                "agent.attest.unavailable", f"event log {log_path}: {exc.strerror}"
            ) from None
        try:
            with self._store.load_key(KeyBlob.load(ak_path)) as ak:
                quote = self._store.quote(ak, nonce, pcrs)
        except (TPMError, StateError, OSError) as exc:
            raise ProtocolError("agent.attest.unavailable", f"quote failed: {exc}") from None
        return AttestationEvidence(quote.attest, quote.signature, event_log)

    def _note_own_keys(self) -> None:
        """The DevID and the state key are in the ledger too (reports show them)."""
        core = self.core
        assert core is not None and self._state is not None
        core.set_time(self.now())
        if "devid" not in core.ledger:
            core.ledger.add("devid", KeyKind.DEVID, active=True)
        assert self.config.identity is not None
        if self.config.identity.ak_key is not None and "ak" not in core.ledger:
            core.ledger.add("ak", KeyKind.AK, active=True)
        if self._state.created:
            for record in list(core.ledger):
                if record.kind is KeyKind.STATE and record.state is not KeyState.DESTROYED:
                    core.ledger.transition(record.name, KeyState.DESTROYED)
            note = (
                "the previous state was sealed to other measurements; "
                "groups must re-add this device"
                if self._state.sealed_elsewhere
                else "state.rollback: an older state was refused; groups must re-add this device"
                if self._state.rollback is not None
                else None
            )
            core.ledger.add(next_state_name(core.ledger), KeyKind.STATE, active=True, note=note)

    # -- the worker loop ----------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._start()
        except KeyfleetError as exc:
            log.error("keyagent cannot start: %s", exc)
            self._shutdown()
            return 1
        assert self._mqtt is not None and self.core is not None
        heap.release_free_pages()  # what the start-up left free
        heap.release_library_pages()  # library code only the start-up ran
        self._notify(self.notifier.ready, self._status_line())
        log.info("keyagent %s ready", self.core.device_id)
        period = self.notifier.ping_period()
        next_ping = time.monotonic()
        next_tick = time.monotonic() + TICK_SECONDS
        subscribed = False
        reported_for: int | None = None
        try:
            while not self._stop.is_set():
                if period is not None and time.monotonic() >= next_ping:
                    self._notify(self.notifier.watchdog)
                    next_ping = time.monotonic() + period
                if self._mqtt_replaced:
                    # a renewal reconnected with a new client: subscribe and report again
                    self._mqtt_replaced = False
                    subscribed, reported_for = False, None
                mqtt = self._mqtt
                if self._blocked:
                    # the state cannot be saved: nothing new is taken in until it can
                    time.sleep(_POLL)
                    if time.monotonic() >= next_tick:
                        next_tick = time.monotonic() + TICK_SECONDS
                        self._resume()
                    continue
                if mqtt.connected:
                    if not subscribed:
                        subscribed = self._subscribe()
                    if subscribed and reported_for != mqtt.reconnects:
                        # after every (re)connect: tell the service our epochs (catch-up)
                        with self._lock:
                            self.core.renewal_reconnected()
                            outcome = self.core.report(self.now())
                        if self._apply(outcome):
                            reported_for = mqtt.reconnects
                wait = (
                    _POLL if period is None else min(_POLL, max(0.0, next_ping - time.monotonic()))
                )
                message = mqtt.get(timeout=wait)
                if message is not None:
                    self._on_message(message)
                    if not mqtt.waiting():  # the end of a burst: what handling it left free
                        heap.release_free_pages()
                self._installs_ended()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_SECONDS
                    # before the tick: an HTTPS renewal takes the renewal backoff's next slot
                    self._renew_expired()
                    with self._lock:
                        outcome = self.core.tick(self.now())
                    self._apply(outcome)
                    if self._state is not None and self._state.rotation_due():
                        with self._lock, contextlib.suppress(StateError):
                            self._persist()  # a destruction waiting for a rotation token
        except KeyfleetError as exc:
            log.error("keyagent stopping on an error it cannot handle: %s", exc)
            self._shutdown()
            return 1
        self._shutdown()
        return 0

    def _subscribe(self) -> bool:
        assert self._mqtt is not None and self.core is not None
        try:
            # the retained trust chain first: a device back from a service signing key rollover
            # learns the new key before the commands signed with it (the service re-sends those
            # it refused, on the keys.report that follows)
            self._mqtt.subscribe(TRUST_TOPIC, timeout=PUBLISH_TIMEOUT)
            self._mqtt.subscribe(self.core.command_topic, timeout=PUBLISH_TIMEOUT)
            self._mqtt.subscribe(ALL_GROUP_COMMITS, timeout=PUBLISH_TIMEOUT)
            # the retained revocation feed head arrives right after this
            self._mqtt.subscribe(REVOCATION_FEED_TOPIC, timeout=PUBLISH_TIMEOUT)
            if self.config.releases.key is not None:
                self._mqtt.subscribe(RELEASES_TOPIC, timeout=PUBLISH_TIMEOUT)
        except TransportError as exc:
            log.warning("subscribe failed, will retry: %s", exc)
            return False
        return True

    def _on_message(self, message: ReceivedMessage) -> None:
        assert self.core is not None and self._mqtt is not None
        try:
            with self._lock:
                outcome = self.core.handle(message.payload, message.topic, self.now())
        except StateError as exc:
            # A key could not be stored (e.g. a new leaf blob on a full disk). The core's
            # handlers change nothing before their last step, so the message is handled afresh
            # once storage works again.
            self._storage_failed(exc)
            self._retry = message
            return
        if outcome.release is not None and self._state is not None:
            try:
                self._state.adopt_release(*outcome.release)  # on disk before the state is saved
                self._reseal_apps()  # before the state key's re-seal drops the older bundle
            except StateError as exc:
                self.core.forget_release(self._state.newest_release())  # taken again later
                self._storage_failed(exc)
                self._retry = message
                return
        if outcome.refused is not None and not outcome.changed:
            with self._lock, contextlib.suppress(StateError):
                self._write_status()  # refusal counters
        if self._apply(outcome, message):
            self._faults.reached("after-publish", outcome.handled)
            self._mqtt.ack(message)
        # else: not acknowledged; the broker redelivers it in the next session
        if outcome.install is not None and not self._blocked:
            self._start_install(outcome.install)
        if outcome.renewed is not None and not self._blocked:
            self._take_renewed(*outcome.renewed)
        if outcome.handled == "trust.chain" and outcome.changed and not self._blocked:
            self._follow_broker_cas()

    def _start_install(self, install: ReleaseInstall) -> None:
        """Run the update hook in a thread (an updater may take minutes); the worker loop
        reports its end (``_installs_ended``)."""
        config = self.config.install
        assert config is not None  # the core refuses release.install without a hook
        self._faults.reached("before-install", ReleaseInstall.TYPE)

        def work() -> None:
            def started() -> None:
                self._faults.reached("during-install", ReleaseInstall.TYPE)

            failure = run_install_hook(config, install.version, started=started)
            self._installs.put((install, failure))

        threading.Thread(target=work, name="update-hook", daemon=True).start()

    def _installs_ended(self) -> None:
        assert self.core is not None
        while True:
            try:
                install, failure = self._installs.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                outcome = self.core.install_finished(install, failure, self.now())
            self._apply(outcome)

    def _reseal_apps(self) -> None:
        """App secrets follow the newest release generation (``agent.appseal``); once none is
        under an older one and the state key is not either, the older bundle goes."""
        state, backend = self._state, self._backend
        if state is None or backend is None or state.releases is None or state.held is not None:
            return
        try:
            backend.reseal_for_release()
        except (TPMError, StateError, OSError) as exc:
            log.error("app secrets could not be sealed again (retried at the next start): %s", exc)
            return
        if state.sealed_generation == state.releases.generation:
            state.releases.resealed()

    @property
    def _blocked(self) -> bool:
        return bool(self._held) or self._retry is not None

    def _storage_failed(self, exc: StateError) -> None:
        """Log the first failure of a blocked period, and once each later one with another
        reason (e.g. a new leaf key blob after the state file: what the operator has to free)."""
        reason = str(exc)
        if self._blocked_since is None:
            self._blocked_since = time.monotonic()
            log.error(
                "the agent's state could not be saved: %s. Nothing is published or acknowledged "
                "until it can be (the last saved state stays as it was); retrying every %g s",
                exc,
                TICK_SECONDS,
            )
        elif reason not in self._blocked_reasons:
            log.error("the agent's state still cannot be saved: %s", exc)
        self._blocked_reasons.add(reason)

    def _resume(self) -> None:
        """After a failed state write: save again; if that works, publish what was held back
        (in order) and acknowledge its messages, then handle the message that had to wait."""
        assert self._mqtt is not None
        if self._held:
            try:
                self._persist()
            except StateError as exc:
                log.debug("state still cannot be saved: %s", exc)
                return
            held, self._held = self._held, []
            for outcome, message in held:
                if self._publish_all(outcome) and message is not None:
                    self._mqtt.ack(message)
        if self._retry is not None:
            message, self._retry = self._retry, None
            self._on_message(message)
        if not self._blocked and self._blocked_since is not None:
            log.warning(
                "the agent's state is saved again after %.0f s: resuming",
                time.monotonic() - self._blocked_since,
            )
            self._blocked_since = None
            self._blocked_reasons.clear()

    def _apply(self, outcome: Outcome, message: ReceivedMessage | None = None) -> bool:
        """Persist (if changed), then publish. True when every publish was acknowledged. If the
        state cannot be saved, nothing is published: the outcome is held (with ``message``, to
        acknowledge after) until ``_resume`` saves it."""
        if outcome.changed:
            self._faults.reached("before-persist", outcome.handled)
            try:
                self._persist()
            except StateError as exc:
                self._storage_failed(exc)
                self._held.append((outcome, message))
                return False
            self._faults.reached("after-persist", outcome.handled)
        return self._publish_all(outcome)

    def _publish_all(self, outcome: Outcome) -> bool:
        assert self._mqtt is not None
        ok = True
        for publish in outcome.publishes:
            try:
                self._mqtt.publish(publish.topic, publish.payload, timeout=PUBLISH_TIMEOUT)
            except TransportError as exc:
                # paho keeps it and resends after the reconnect; the inbound message stays
                # unacknowledged so the whole exchange is redone if we die before that.
                log.warning("publish of %s not confirmed: %s", publish.type, exc)
                ok = False
        if outcome.epochs_changed:
            self._notify(self.notifier.status, self._status_line())
        return ok

    def _persist(self) -> None:
        with self._lock:
            core, state = self.core, self._state
            assert core is not None and state is not None and self._keys is not None
            if state.held is not None:
                # an unapproved image: nothing is saved over the held state, and no key blob
                # of it is collected; only the status is written
                self._write_status()
                return
            core.set_time(self.now())
            live = core.leaf_refs()
            self._keys.note_destroyed(core.ledger, live)
            destroyed = destroyed_keys(core.ledger)
            rotates = state.will_rotate(destroyed)
            if rotates:
                note_rotation(core.ledger, state.counter_value + 1)
            note_erased(core.ledger, state.counter_value + int(rotates), rotated=rotates)
            state.save(core.to_state(inline_trees=False), destroyed)
            core.mark_clean()
            self._keys.collect(live)
            try:
                evicted = self._keys.settle(core.ledger, state.parent_budget, self.now())
            except TPMError as exc:
                log.warning("rotating parents not settled (retried at the next save): %s", exc)
                evicted = False
            if evicted:
                # the ledger says "parent evicted"
                state.save(core.to_state(inline_trees=False), destroyed)
            self._write_status()

    @staticmethod
    def _notify(send: Callable[..., None], *args: str) -> None:
        """sd_notify is advice to the supervisor: a vanished socket must not stop the agent."""
        try:
            send(*args)
        except OSError as exc:
            log.debug("sd_notify failed: %s", exc)

    def _status_line(self) -> str:
        assert self.core is not None
        groups = self.core.groups()
        if not groups:
            text = "no groups"
        else:
            text = ", ".join(f"{name}@{g.epoch}" for name, g in sorted(groups.items()))
        if self._state is not None and self._state.sealed_elsewhere:
            text += "; state sealed to other measurements: re-add needed"
        if self._state is not None and self._state.rollback is not None:
            text += "; state.rollback: an older state was refused, re-add needed"
        if self._state is not None and self._state.held is not None:
            text += "; release.unapproved: state held until an approved release boots"
        return text

    def _write_status(self) -> None:
        core, state = self.core, self._state
        assert core is not None and state is not None
        state_file = state.state_file
        status: dict[str, Any] = core.status()
        status.update(
            {
                "pid": os.getpid(),
                "updated": self.now(),
                "state_generation": None if state_file is None else state_file.generation,
                "state_counter": None if state_file is None else state_file.counter,
                "release": state.release_status(),
                "state_rotations": state.rotations,
                "state_rollback": state.rollback,
                "sealed_elsewhere": state.sealed_elsewhere,
                "mqtt_connected": self._mqtt.connected if self._mqtt is not None else False,
            }
        )
        atomic_write(
            self.state_dir / STATUS_FILE,
            json.dumps(status, indent=2, sort_keys=True).encode(),
            mode=0o644,
        )

    def _shutdown(self) -> None:
        self._notify(self.notifier.stopping)
        if self._api is not None:
            self._api.stop()
        if self._mqtt is not None:
            self._mqtt.close()
        try:
            if self.core is not None and self._state is not None and self.core.dirty:
                self._persist()
        except StateError as exc:
            log.error("state not saved at shutdown (the last saved state stays): %s", exc)
        finally:
            if self._store is not None:
                self._store.close()  # flushes every TPM object still loaded


def run(config_path: str | None, *, allow_insecure: bool = False) -> int:
    """``keyagent run``: load the configuration, run until SIGTERM."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_path, require_provisioned=True)
        daemon = Daemon(config, allow_insecure=allow_insecure)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    signal.signal(signal.SIGTERM, lambda signum, frame: daemon.stop())
    signal.signal(signal.SIGINT, lambda signum, frame: daemon.stop())
    return daemon.run()


def read_status(config_path: str | None) -> dict[str, Any]:
    """The status the running daemon last wrote (no secrets; no TPM needed to read it)."""
    config = load_config(config_path)
    path = config.state.dir / STATUS_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise StateError(f"no status at {path}: has keyagent run ever started?") from None
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read status {path}: {exc}") from None
    return data

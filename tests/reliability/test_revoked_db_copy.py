"""Issue 8: a revoked device and a copy of the service's database together cannot derive any later
epoch's key. On a whole installation (``firmware_sim.lab``: Mosquitto, ``keyfleet serve`` on a
SQLite file, four simulated devices with swtpm running ``keyagent``).

Scenario. Group ``gr`` = X, A, B. A broker-level tap (every topic, from before the group exists)
records every message. X's agent is stopped and everything X holds is taken: its state file and
the TPM-sealed state key, unsealed through X's own TPM (the whole agent state: group state with
tree, epoch secrets incl. init/joiner secrets, node private keys, data keys, outstanding key
packages), every leaf key blob in its state directory (the private keys stay in X's TPM but X
can use them: each is loaded into X's TPM and used for ECDH), and every file of its state
directory. Then X is revoked (the remove commit, epoch e+1), the group is rekeyed twice (e+2,
e+3) and a fourth device D is added (e+4, with a welcome; e+5 is its first self-update).
Then a copy of the database file (``fleet.db`` with its ``-wal``/``-shm``: commit log with
welcomes, public group state, key records, every table) is taken.

Derive attempts, each must fail:

1. ``Group.process`` of every later commit (from the copied commit log) with X's group as it
   was: ``mls.removed`` for the remove commit, an epoch refusal for the rest.
2. Bypassing the agent: the public states of every later epoch are rebuilt from X's public state
   and the commits (``verify_commit``, everything public), and EVERY HPKE ciphertext of every
   UpdatePath (every node, every recipient position) is opened (``decrypt_with_label`` with that
   epoch's provisional context, as a member would) with EVERY private key X has: each leaf key
   in its TPM and each node private key in its state. None opens.
3. X's init secret with the commit secret a commit without a path secret would give (zero):
   the next epoch's confirmation tag does not match, and the secrets differ from the real ones.
4. Every welcome (commit log and tapped ``group.welcome``/``svc.welcome``): no entry is for a
   key package X ever published (tapped ``group.key_package`` messages and those in its state),
   ``Group.join`` with each of X's key packages and its leaf key refuses, and every entry's
   sealed GroupSecrets is opened with every private key of X: none opens.

Finally the later epochs' secrets, taken from a remaining member's (A's) unsealed state after
each later epoch - every EpochSecrets field but the public epoch authenticator (exporter, init
and joiner secrets included), the data keys (MLS-Exporter outputs) of epochs after e and A's
node private keys - appear nowhere in the combined material (X's unsealed state, X's files,
the database copy, every tapped message, the outputs of the attempts above) in raw, hex, HEX,
base64 or base64url form.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session

from agent.config import load_config
from agent.daemon import LEAF_DIR, TpmKeys, load_devid
from agent.mqtt import ReceivedMessage
from agent.protocol.errors import CryptoError, ProtocolError
from agent.protocol.hpke import serialize_public_key
from agent.protocol.mls.crypto import NH, decrypt_with_label, mac
from agent.protocol.mls.group import WELCOME_LABEL, Group
from agent.protocol.mls.key_schedule import EpochSecrets, derive_epoch
from agent.protocol.mls.messages import Commit, KeyPackage, Welcome
from agent.protocol.mls.public import UPDATE_PATH_LABEL, PublicState, verify_commit
from agent.protocol.wire.envelope import RawMessage, decode_message
from agent.tpm.blob import KeyBlob
from agent.tpm.store import TPMStore
from firmware_sim.lab import Lab, LabDevice
from provisioning.registry import Registry, make_engine
from tests.fixtures.fleet import service_tap
from tests.reliability.secret_search import find, name_all, positive_control

pytestmark = [pytest.mark.e2e, pytest.mark.long]

LAB_OPTIONS = {"devices": 4, "ack_timeout": 20, "commit_request_timeout": 3}
G = "gr"


@pytest.fixture(scope="module")
def lab(fleet_lab: Lab) -> Lab:
    return fleet_lab


class Tap:
    """Every message on the broker (service TLS identity, another client id)."""

    def __init__(self, lab: Lab) -> None:
        self.seen: list[ReceivedMessage] = []
        self.client = service_tap(lab, "tap-all", on_message=self.seen.append)
        self.client.subscribe("kf/v1/#")

    def bodies(self, type_: str) -> list[dict[Any, Any]]:
        out = []
        for message in list(self.seen):
            decoded = decode_message(RawMessage.from_bytes(message.payload))
            if decoded.type == type_:
                out.append(dict(decoded.untrusted_body))
        return out


@pytest.fixture
def tap(lab: Lab) -> Iterator[Tap]:
    made = Tap(lab)
    yield made
    made.client.close()


def op(lab: Lab, *args: str, operator: str = "op-ops") -> dict[str, Any]:
    result = lab.op(*args, operator=operator, timeout=120)
    assert result.returncode == 0 and result.final is not None, str(result)
    assert result.final["status"] == "done", str(result)
    return result.final


def epoch_of(lab: Lab) -> int:
    return int(next(row for row in lab.groups() if row["group_id"] == G)["epoch"])


def later_secrets(lab: Lab, member: LabDevice, after: int) -> dict[str, bytes]:
    """A remaining member's secrets of its current epoch (> ``after``): every EpochSecrets
    field but the epoch authenticator, its node private keys, data keys of epochs > ``after``;
    the member is stopped to unseal its state and booted again."""
    lab.stop_agent(member)
    try:
        state = lab.agent_state(member)
    finally:
        lab.reboot(member)
    group = state["groups"][G]["group"]
    public = PublicState.from_obj(group["public"])
    epoch = public.epoch
    assert epoch > after
    out = {
        f"e{epoch}.{name}": bytes(value)
        for name, value in group["secrets"].items()
        if name != "epoch_authenticator"
    }
    assert {f.name for f in fields(EpochSecrets)} - {"epoch_authenticator"} <= {
        k.split(".", 1)[1] for k in out
    }
    out.update({f"e{epoch}.node{x}": bytes(k) for x, k in group["nodes"].items()})
    out.update(
        {f"data_key[e{e}]": bytes(k) for e, k in state["data_keys"][G].items() if int(e) > after}
    )
    return out


def test_a_revoked_device_and_a_database_copy_derive_no_later_epoch_key(
    lab: Lab, tap: Tap, tmp_path: Path, summary: Any
) -> None:
    x, a, b, d = lab.devices[:4]
    # A founds the group; B and X join through key packages (X publishes one)
    op(lab, "group", "create", G, "--members", a.id, b.id, x.id)
    lab.wait_settled(G, [x, a, b], timeout=60)  # the joiners' first self-updates
    e = epoch_of(lab)
    lab.wait_epoch(G, e, [x, a, b], timeout=30)

    # -- everything X holds ----------------------------------------------------------------
    lab.stop_agent(x)
    x_state = lab.agent_state(x)
    x_files = {
        f"x:{p.relative_to(x.state_dir)}": p.read_bytes()
        for p in sorted(x.state_dir.rglob("*"))
        if p.is_file() and not p.is_socket()
    }
    assert any(name.endswith("agent.state") for name in x_files)
    x_group_state = x_state["groups"][G]["group"]
    assert PublicState.from_obj(x_group_state["public"]).epoch == e

    # -- X revoked, two rekeys, D added (and its first update): five later epochs ----------
    secrets: dict[str, bytes] = {}
    op(lab, "revoke", x.id, "--reason", "reliability: stolen", operator="op-admin")
    assert epoch_of(lab) == e + 1
    secrets.update(later_secrets(lab, a, e))
    for _ in range(2):
        op(lab, "rekey", "--group", G)
        secrets.update(later_secrets(lab, a, e))
    op(lab, "group", "add", G, d.id)
    secrets.update(later_secrets(lab, a, e))  # the add's epoch, unless D already updated
    final = lab.wait_settled(G, [a, b, d], timeout=60)  # D's first self-update
    assert final == e + 5
    if not any(k.startswith(f"e{final}.") for k in secrets):
        secrets.update(later_secrets(lab, a, e))
    captured = {k.split(".")[0] for k in secrets if k.startswith("e")}
    assert {f"e{n}" for n in (e + 1, e + 2, e + 3, final)} <= captured
    assert captured <= {f"e{n}" for n in range(e + 1, final + 1)}

    # -- a copy of the database ------------------------------------------------------------
    copy_dir = tmp_path / "db-copy"
    copy_dir.mkdir()
    for path in lab.database.parent.iterdir():
        if path.name.startswith(lab.database.name):
            shutil.copy2(path, copy_dir / path.name)
    db_files = {f"db:{p.name}": p.read_bytes() for p in sorted(copy_dir.iterdir())}
    engine = make_engine(f"sqlite:///{copy_dir / lab.database.name}")
    try:
        with Session(engine) as session:
            commits = Registry(session).commits_from(G, e)
    finally:
        engine.dispose()
    assert [c.epoch for c in commits] == list(range(e, final))

    # -- the attempts, with X's TPM (its agent stays stopped; the device is revoked) --------
    outputs: list[bytes] = []
    attempts = AttemptLog()
    lab.flush_tpm(x)
    config = load_config(x.agent_config)
    with TPMStore(x.tcti) as store:
        devid = load_devid(store, config, False)
        keys = TpmKeys(store, devid, x.state_dir / LEAF_DIR)
        leaf_keys = [
            store.load_key(KeyBlob.load(path))
            for path in sorted((x.state_dir / LEAF_DIR).glob("*.pem"))
        ]
        x_group = Group.from_state(x_group_state, keys.load_leaf)
        private_keys = {
            **{f"leaf:{serialize_public_key(k.public_key()).hex()[:16]}": k for k in leaf_keys},
            **{
                f"node{node}": ec.derive_private_key(int.from_bytes(raw, "big"), ec.SECP256R1())
                for node, raw in x_group_state["nodes"].items()
            },
        }
        assert leaf_keys and len(private_keys) >= 2, private_keys.keys()

        # 1. the agent's own processing
        for record in commits:
            commit = Commit.decode(record.commit)
            with pytest.raises(ProtocolError) as refused:
                x_group.process(commit)
            attempts.note("Group.process", refused.value.check)
            if record.epoch == e:
                assert refused.value.check == "mls.removed"

        # 2. every path ciphertext with every key X holds; 3. zero commit secret
        public = x_group.public_state
        for record in commits:
            commit = Commit.decode(record.commit)
            verified = verify_commit(public, commit)
            assert commit.content.path is not None
            for node in commit.content.path.nodes:
                for kem, ct in node.encrypted_path_secret:
                    for name, key in private_keys.items():
                        try:
                            opened = decrypt_with_label(
                                key, UPDATE_PATH_LABEL, verified.provisional_context, kem, ct
                            )
                        except CryptoError:
                            attempts.note("path ciphertext x key", "hpke.open")
                            continue
                        outputs.append(opened)
                        raise AssertionError(f"{name} opened a path secret of epoch {record.epoch}")
            following = verified.next_state()
            if record.epoch == e:
                guess = derive_epoch(
                    x_group_state["secrets"]["init_secret"], bytes(NH), following.group_context()
                )
                tag = mac(guess.confirmation_key, following.confirmed_transcript_hash)
                assert tag != commit.confirmation_tag
                attempts.note("init secret + zero commit secret", "confirmation-tag mismatch")
                outputs.extend(getattr(guess, f.name) for f in fields(EpochSecrets))
            public = following

        # 4. welcomes
        welcomes = [Welcome.decode(r.welcome) for r in commits if r.welcome is not None]
        # welcomes of later epochs only (the tap also saw the one X joined with)
        welcomes += [
            Welcome.decode(w["welcome"])
            for kind in ("group.welcome", "svc.welcome")
            for w in tap.bodies(kind)
            if w["epoch"] > e
        ]
        assert welcomes, "the add of D made no welcome"
        x_packages = [KeyPackage.decode(bytes(kp)) for _, kp in x_state["key_packages"]]
        x_packages += [
            KeyPackage.decode(m["key_package"])
            for m, sender in tap_key_packages(tap)
            if sender == x.id
        ]
        assert x_packages, "X published no key package the tap saw"
        x_refs = {kp.ref() for kp in x_packages}
        for welcome in welcomes:
            assert not x_refs & {s.key_package_ref for s in welcome.secrets}
            for kp in x_packages:
                leaf = keys_for(leaf_keys, kp.leaf_node().encryption_key)
                init = keys_for(leaf_keys, kp.init_key)
                if leaf is None or init is None:
                    attempts.note("Group.join", "leaf or init key gone (used and destroyed)")
                    continue
                with pytest.raises(ProtocolError) as refused:
                    Group.join(welcome, kp, leaf, init_key=init)
                attempts.note("Group.join", refused.value.check)
            for entry in welcome.secrets:
                for name, key in private_keys.items():
                    try:
                        opened = decrypt_with_label(
                            key,
                            WELCOME_LABEL,
                            welcome.encrypted_group_info,
                            entry.kem_output,
                            entry.ciphertext,
                        )
                    except CryptoError:
                        attempts.note("welcome secrets x key", "hpke.open")
                        continue
                    outputs.append(opened)
                    raise AssertionError(f"{name} opened a welcome's GroupSecrets")
        for key in leaf_keys:
            key.close()

    # -- no later secret anywhere in what they hold -----------------------------------------
    for secret in list(secrets.values())[:3]:
        positive_control(secret)
    haystacks = {
        "x:unsealed-state": bytes(cbor2.dumps(x_state)),
        **x_files,
        **db_files,
        **{f"tap:{n}:{m.topic}": m.payload for n, m in enumerate(tap.seen)},
        **name_all("attempt-output", outputs),
    }
    # control: X's own epoch-e secret is found in what X holds (the haystacks are real)
    own = {"x.e.epoch_secret": bytes(x_group_state["secrets"]["epoch_secret"])}
    assert ("x.e.epoch_secret", "raw", "x:unsealed-state") in find(own, haystacks)
    found = find(secrets, haystacks)
    assert found == [], found
    assert len(secrets) >= 4 * 11, len(secrets)
    summary.record(
        "revoked_device_with_db_copy",
        {
            "later_epochs": final - e,
            "later_secrets_searched": len(secrets),
            "x_private_keys": len(private_keys),
            "commits": len(commits),
            "welcomes": len(welcomes),
            "attempts": attempts.counts,
            "haystacks": len(haystacks),
            "haystack_bytes": sum(len(v) for v in haystacks.values()),
            "found": len(found),
        },
    )


class AttemptLog:
    """How many derive attempts of each kind were made and how each ended."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def note(self, kind: str, outcome: str) -> None:
        label = f"{kind}: {outcome}"
        self.counts[label] = self.counts.get(label, 0) + 1


def tap_key_packages(tap: Tap) -> list[tuple[dict[Any, Any], str]]:
    out = []
    for message in list(tap.seen):
        decoded = decode_message(RawMessage.from_bytes(message.payload))
        if decoded.type == "group.key_package":
            out.append((dict(decoded.untrusted_body), decoded.sender))
    return out


def keys_for(leaf_keys: list[Any], wanted: bytes) -> Any:
    return next(
        (k for k in leaf_keys if serialize_public_key(k.public_key()) == wanted),
        None,
    )

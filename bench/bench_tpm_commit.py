"""TPM commands a device spends per processed commit, counted on real swtpm instances.

Not a test: prints a JSON list of records to stdout (progress to stderr).

Eight members, each with its own swtpm, DevID, leaf and init keys in the TPM
(``agent.daemon.TpmKeys``, the keyagent's key provider). The group is made by one add commit
(every joiner opens its Welcome with one ECDH on its one-time init key in its TPM), then
installed into each member's ``AgentCore``. Then every member in turn is asked (service-signed
``svc.commit_request``) for a self-update, and one removal is committed; each commit is relayed
(service-signed ``group.commit``) to every other member's core, as keyagent run would hand it
over. ``TPMStore.commands_issued`` is read before
and after:

- ``Group.process`` alone (what TreeKEM costs: at most one ECDH_ZGen with the TPM leaf key,
  docs/treekem.md),
- the whole ``AgentCore.handle`` of the relayed commit (processing + the signed ``group.ack``:
  every envelope a device sends is signed by its DevID key in the TPM).

Then a full rekey by Update proposals (``keyfleet rekey --full``, service/fullrekey.py):
every member but member 0 answers a ``svc.update_proposal_request`` (a new TPM leaf key, the
Update signed by its DevID key, the signed ``group.update_proposal``), member 0 commits them all
with its own self-update, and every member handles the relayed commit (its proposed leaf key
loaded, at most one ECDH, the ack). Per member, what a full rekey costs does not depend on N (one
proposal, one commit received per batch), so eight swtpm members give the per-member counts of
a fleet of any size; a join is counted above.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from agent.core import AgentCore
from agent.daemon import TpmKeys
from agent.protocol.hpke import generate_key_pair, serialize_public_key
from agent.protocol.mls.group import Group
from agent.protocol.mls.messages import Commit, KeyPackage
from agent.protocol.topics import SERVICE_ID
from agent.protocol.wire.envelope import Signer, encode_message, open_message
from agent.protocol.wire.messages.base import Body
from agent.protocol.wire.messages.group import CommitMessage, UpdateProposal
from agent.protocol.wire.messages.service import (
    CommitAction,
    CommitRequest,
    UpdateProposalRequest,
)
from agent.tpm import KeyKind, TPMStore
from firmware_sim.swtpm import Swtpm
from provisioning import pki
from tests.device_certs import devid_cert_der
from tests.operator_certs import authorize, membership

MEMBERS = 8
SERVICE = SERVICE_ID
TARGET = 1


def main() -> None:
    service_key = pki.generate_key()
    now = int(time.time())
    seq = iter(range(1, 1_000_000))

    def envelope(body: Body, to: str) -> bytes:
        return encode_message(body, key=service_key, sender=SERVICE, to=to, seq=next(seq), time=now)

    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        base = Path(tmp)
        cores: list[AgentCore] = []
        stores: list[TPMStore] = []
        keyprov: list[TpmKeys] = []
        credentials: list[bytes] = []
        print(f"starting {MEMBERS} swtpm instances ...", file=sys.stderr)
        for i in range(MEMBERS):
            state = base / f"tpm{i}"
            state.mkdir()
            tpm = Swtpm(state_dir=state, log_path=base / f"swtpm{i}.log")
            tpm.start()
            stack.callback(tpm.stop)
            store = stack.enter_context(TPMStore(tpm.tcti))
            devid = store.create_and_load(KeyKind.DEVID)
            keys = TpmKeys(store, devid, base / f"leaves{i}")
            credentials.append(devid_cert_der(f"dev-tpm-{i}", devid))
            core = AgentCore(
                f"dev-tpm-{i}",
                service_key.public_key(),
                keys,
                credential=credentials[-1],
                # the devices trust the test operator and device CAs; the group is built with
                # the MLS API below, so no KeyPackage is checked for a TPM proof here
                membership=membership(),
                now=now,
            )
            cores.append(core)
            stores.append(store)
            keyprov.append(keys)

        # the group: member 0 creates it and adds everyone else in one commit
        leaf0 = keyprov[0].new_leaf_key()
        own = KeyPackage.create(
            b"dev-tpm-0",
            keyprov[0].devid,
            leaf0.public_key(),
            credentials[0],
            init_key=generate_key_pair().public_key(),  # the creator's: never sealed to
        )
        group = Group.create(b"g-tpm", own, leaf0)
        joiners = []
        for i in range(1, MEMBERS):
            leaf = keyprov[i].new_leaf_key()
            init = keyprov[i].new_leaf_key()  # the one-time init key, in the TPM too
            kp = KeyPackage.create(
                f"dev-tpm-{i}".encode(),
                keyprov[i].devid,
                leaf.public_key(),
                credentials[i],
                init_key=init.public_key(),
            )
            joiners.append((kp, leaf, init))
        result = group.add(keyprov[0].devid, [kp for kp, _, _ in joiners])
        assert result.welcome is not None
        groups = [result.group]
        join_costs = []
        for i, (kp, leaf, init) in enumerate(joiners, start=1):
            before = stores[i].commands_issued
            groups.append(Group.join(result.welcome, kp, leaf, init_key=init))
            join_costs.append(stores[i].commands_issued - before)
        for core, g in zip(cores, groups, strict=True):
            # The bench builds the group with the MLS API directly and hands each member its
            # state (install_group loads the leaf key once; rounds count their commands apart).
            core.install_group(g, now)

        mls_only: list[int] = []
        full: list[int] = []
        committer_costs: list[int] = []
        by_action: dict[str, list[int]] = {}

        def round_(committer: int, request: CommitRequest) -> None:
            core = cores[committer]
            before = stores[committer].commands_issued
            out = core.handle(envelope(request, core.device_id), core.command_topic, now)
            if not out.publishes or out.publishes[0].type != "group.commit":
                raise RuntimeError(f"no commit from member {committer}: {out.refused}")
            committer_costs.append(stores[committer].commands_issued - before)
            by_action.setdefault(request.action.value, []).append(committer_costs[-1])
            devid_public = keyprov[committer].devid.public_key()
            message = open_message(
                out.publishes[0].payload,
                lambda kid: Signer(core.device_id, devid_public),
                now=now,
                recipients=(SERVICE,),
            )
            assert isinstance(message.body, CommitMessage)
            commit = message.body.commit
            relay = envelope(CommitMessage("g-tpm", message.body.epoch, commit), "g-tpm")
            removed = request.member
            for i, other in enumerate(cores):
                if "g-tpm" not in other.groups():
                    continue
                if i != committer and other.device_id != removed:
                    g = other.groups()["g-tpm"]
                    before = stores[i].commands_issued
                    g.process(Commit.decode(commit))
                    mls_only.append(stores[i].commands_issued - before)
                before = stores[i].commands_issued
                answer = other.handle(relay, "kf/v1/grp/g-tpm/commit", now)
                if answer.refused is not None:
                    raise RuntimeError(f"member {i} refused: {answer.refused}")
                if i != committer and other.device_id != removed:
                    full.append(stores[i].commands_issued - before)

        for i in range(MEMBERS):
            epoch = cores[i].epoch("g-tpm")
            assert epoch is not None
            round_(i, CommitRequest(os.urandom(16), "g-tpm", epoch, CommitAction.UPDATE))
        # a full rekey by Update proposals
        epoch = cores[0].epoch("g-tpm")
        assert epoch is not None
        request_id = os.urandom(16)
        proposal_costs: list[int] = []
        updates: list[bytes] = []
        for i in range(1, MEMBERS):
            core = cores[i]
            before = stores[i].commands_issued
            ask = UpdateProposalRequest(request_id, "g-tpm", epoch)
            out = core.handle(envelope(ask, core.device_id), core.command_topic, now)
            proposal_costs.append(stores[i].commands_issued - before)
            devid_public = keyprov[i].devid.public_key()
            answer = open_message(
                out.publishes[0].payload,
                lambda kid, d=core.device_id, k=devid_public: Signer(d, k),
                now=now,
                recipients=(SERVICE,),
            )
            assert isinstance(answer.body, UpdateProposal)
            updates.append(answer.body.update)
        before = stores[0].commands_issued
        request = CommitRequest(
            os.urandom(16), "g-tpm", epoch, CommitAction.UPDATE, updates=tuple(updates)
        )
        out = cores[0].handle(envelope(request, cores[0].device_id), cores[0].command_topic, now)
        full_rekey_committer = stores[0].commands_issued - before
        devid_public = keyprov[0].devid.public_key()
        sent = open_message(
            out.publishes[0].payload,
            lambda kid: Signer(cores[0].device_id, devid_public),
            now=now,
            recipients=(SERVICE,),
        )
        assert isinstance(sent.body, CommitMessage)
        relay = envelope(CommitMessage("g-tpm", epoch, sent.body.commit), "g-tpm")
        full_rekey_process: list[int] = []
        for i, core in enumerate(cores):
            before = stores[i].commands_issued
            answer_out = core.handle(relay, "kf/v1/grp/g-tpm/commit", now)
            if answer_out.refused is not None:
                raise RuntimeError(f"member {i} refused the full rekey: {answer_out.refused}")
            if i != 0:
                full_rekey_process.append(stores[i].commands_issued - before)
        if len({c.groups()["g-tpm"].epoch_authenticator for c in cores}) != 1:
            raise RuntimeError("the members do not agree after the full rekey")
        epoch = cores[0].epoch("g-tpm")
        assert epoch is not None
        removed = f"dev-tpm-{MEMBERS - 1}"
        point = serialize_public_key(keyprov[MEMBERS - 1].devid.public_key())
        # every member checks the operators' Authorization of the removal (docs/authorization.md)
        authz = authorize("group.remove", "g-tpm", [(removed, point)], now=now)
        round_(
            0,
            CommitRequest(
                os.urandom(16), "g-tpm", epoch, CommitAction.REMOVE, member=removed, authz=authz
            ),
        )
        live = [c for c in cores if "g-tpm" in c.groups()]
        authenticators = {c.groups()["g-tpm"].epoch_authenticator for c in live}
        if len(authenticators) != 1 or len(live) != MEMBERS - 1:
            raise RuntimeError("the members do not agree")

    records: list[dict[str, Any]] = [
        {
            "name": "tpm_commands_per_processed_commit_mls",
            "value": max(mls_only),
            "unit": "TPM commands (max)",
            "target": TARGET,
            "met": max(mls_only) <= TARGET,
            "detail": (
                f"Group.process on {len(mls_only)} commit receptions ({MEMBERS} swtpm members, "
                f"{MEMBERS} updates + 1 remove): max {max(mls_only)}, mean "
                f"{statistics.mean(mls_only):.2f}; joining by Welcome: {max(join_costs)} each"
            ),
        },
        {
            "name": "tpm_commands_per_join",
            "value": max(join_costs),
            "unit": "TPM commands (max)",
            "target": TARGET,
            "met": max(join_costs) <= TARGET,
            "detail": (
                f"Group.join by {len(join_costs)} swtpm joiners: the Welcome opened with one "
                "ECDH_ZGen on the KeyPackage's one-time init key, none on the leaf key "
                "(docs/treekem.md, 'Joining')"
            ),
        },
        {
            "name": "tpm_commands_per_processed_commit_with_ack",
            "value": max(full),
            "unit": "TPM commands (max)",
            "target": TARGET,
            "met": max(full) <= TARGET,
            "detail": (
                f"AgentCore.handle of the relayed commit, {len(full)} receptions: processing "
                "plus the group.ack envelope signed by the DevID key in the TPM; mean "
                f"{statistics.mean(full):.2f}"
            ),
        },
        {
            "name": "tpm_commands_per_own_commit",
            "value": max(committer_costs),
            "unit": "TPM commands (max)",
            "target": None,
            "met": None,
            "detail": (
                "the committer, per commit: "
                + ", ".join(f"{a} {max(c)}" for a, c in sorted(by_action.items()))
                + " (an update makes a new TPM leaf key: create, load and their ESAPI calls; "
                "every commit: the commit signature and the group.commit envelope signature "
                "by the DevID key)"
            ),
        },
    ]
    per_member = [p + q for p, q in zip(proposal_costs, full_rekey_process, strict=True)]
    records.append(
        {
            "name": "tpm_commands_per_member_full_rekey",
            "value": max(per_member),
            "unit": "TPM commands (max)",
            "target": None,
            "met": None,
            "detail": (
                f"{MEMBERS - 1} swtpm members: the Update proposal (new leaf key, Update and "
                f"envelope signatures) max {max(proposal_costs)}, handling the commit that "
                f"carries it (at most one ECDH, on the proposed key, and the ack) max "
                f"{max(full_rekey_process)}; the committer, committing "
                f"{len(updates)} Updates with its own self-update: {full_rekey_committer}"
            ),
        }
    )
    print(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()

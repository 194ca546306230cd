"""Issue 8, hostile input on the device and host side: local API requests (``LocalApiServer.handle``
over the real ``TpmKeyBackend`` and a real ``AgentCore`` in a group, software keys, a
FakeSealer in place of the TPM's sealing) and the configuration files (the agent's ``agent.toml``
through ``agent.config.load_config``, the service's TOML through ``provisioning.config``), each
10,000 malformed inputs from the seeded fuzzer of tests/reliability/test_fuzz_messages.py plus
TOML-specific ones (lines dropped, duplicated or swapped, values replaced by any TOML type,
unknown keys, arrays and inline tables nested up to 100,000 deep).

Local API: every input gets exactly one framed answer; ``ok`` only for a request that decodes
and that the access policy allows; every refusal is counted in the server's counters by check
id (compared with the test's own tally from the answers); a refused request leaves the agent
state and the sealed-secret directory unchanged.
Configuration: ``ConfigError`` (with the problems named) or a loaded configuration, nothing
else; the configuration and the files it names are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config as load_agent_config
from agent.core import AgentCore
from agent.keybackend import TpmKeyBackend
from agent.localapi.access import AccessPolicy, AccessRule, PeerCredentials
from agent.localapi.protocol import LENGTH, Request, decode_response, encode_request
from agent.localapi.server import LocalApiServer
from agent.protocol.errors import ConfigError, ProtocolError
from agent.protocol.secret import Secret
from agent.tpm.blob import KeyBlob
from provisioning.config import load_config as load_service_config
from tests.pure.test_agent_config import agent_files
from tests.pure.test_wire_fuzz import random_value
from tests.reliability.test_fuzz_messages import INPUTS, Tally, malform

pytestmark = [pytest.mark.pure, pytest.mark.long]

APP = PeerCredentials(pid=4242, uid=1000, gid=1000)
OTHER = PeerCredentials(pid=4343, uid=1001, gid=1001)


# ---- local API ------------------------------------------------------------------------------


class FakeSealer:
    """Stands in for the TPM's PCR-policy sealing (``agent.tpm.TPMStore.seal/unseal``): the blob
    carries the secret XORed with a fixed pad, enough for a round trip in a pure test."""

    PAD = hashlib.sha256(b"fake sealer").digest() * 4

    def seal(self, secret: Secret | bytes, pcrs: Any = ()) -> KeyBlob:
        raw = secret.reveal() if isinstance(secret, Secret) else secret
        hidden = bytes(b ^ p for b, p in zip(raw, self.PAD, strict=False))
        return KeyBlob(public=b"\x00\x02ok", private=len(hidden).to_bytes(2, "big") + hidden)

    def unseal(self, blob: KeyBlob) -> Secret:
        hidden = blob.private[2:]
        return Secret(bytes(b ^ p for b, p in zip(hidden, self.PAD, strict=False)))


def agent_in_a_group() -> AgentCore:
    from tests.pure.test_agent_core import group_of_two

    _, a, _ = group_of_two()
    return a


def tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        digest.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def api_seeds(core: AgentCore) -> list[bytes]:
    blob = core.encrypt("g1", b"a message for the group", 1_700_000_000)
    requests = [
        Request("encrypt", group="g1", data=b"plaintext"),
        Request("decrypt", group="g1", data=blob),
        Request("sign", data=b"to be signed"),
        Request("seal", name="db-password", secret=b"s3cret-app-value"),
        Request("unseal", name="db-password"),
        Request("list-keys"),
        Request("encrypt", group="g2", data=b"no such group"),
    ]
    return [encode_request(r)[LENGTH.size :] for r in requests]


def test_local_api_meets_10000_malformed_requests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import cbor2

    core = agent_in_a_group()
    seal_dir = tmp_path / "app-seal"
    seal_dir.mkdir()
    backend = TpmKeyBackend(
        core,
        threading.RLock(),
        signer=core._keys.devid,  # type: ignore[attr-defined]
        sealer=FakeSealer(),
        seal_dir=seal_dir,
        pcrs=(7,),
        on_change=lambda: None,
        clock=lambda: 1_700_000_000.0,
    )
    policy = AccessPolicy(
        [AccessRule(uid=APP.uid, gid=None, operations=frozenset({"*"}), groups=frozenset({"g1"}))]
    )
    server = LocalApiServer(tmp_path / "api.sock", policy, backend)
    seeds = api_seeds(core)
    # one genuine seal first, so unseal has something to find
    assert decode_response(server.handle(APP, seeds[3])[LENGTH.size :]) is None

    def state() -> tuple[bytes, str]:
        return cbor2.dumps(core.to_state(), canonical=True), tree_digest(seal_dir)

    tally = Tally()
    answers: Counter[str] = Counter()
    before_counters = Counter(server.counters())
    for n in range(INPUTS):
        rng = random.Random(n)
        payload = malform(seeds, rng, limit=1 << 20)
        peer = OTHER if rng.randrange(10) == 0 else APP
        before = state()
        framed: Any = tally.timed(lambda: server.handle(peer, payload))  # noqa: B023
        (length,) = LENGTH.unpack_from(framed)
        assert length == len(framed) - LENGTH.size, n
        try:
            decode_response(framed[LENGTH.size :])
        except ProtocolError as refusal:
            assert refusal.check not in ("api.internal", "api.unavailable"), (n, refusal)
            answers[refusal.check] += 1
            tally.refused[refusal.check] += 1
            assert state() == before, f"input {n} [{refusal.check}] changed the agent state"
            continue
        assert peer is APP, f"input {n}: a request of an unauthorized uid succeeded"
        tally.accepted += 1
    counters = Counter(server.counters())
    counters.subtract(before_counters)
    assert counters["requests"] == INPUTS
    assert counters["ok"] == tally.accepted
    by_check = Counter(
        {k.removeprefix("error."): v for k, v in counters.items() if k.startswith("error.")}
    )
    by_check["api.denied"] += counters["refused"]
    assert +by_check == +answers, (by_check, answers)
    assert tally.total_refused >= INPUTS * 0.8
    with capsys.disabled():
        print(f"\nLocalApiServer.handle: {tally.summary()}")


# ---- configuration files --------------------------------------------------------------------

TOML_VALUES = (
    '"text"',
    '""',
    "0",
    "-1",
    "99999999999999999999",
    "1.5",
    "nan",
    "true",
    "[]",
    "[1, 2]",
    "{}",
    "{ a = 1 }",
    "1979-05-27T07:32:00Z",
    '"/nonexistent/file.pem"',
    '"../../../../etc/shadow"',
    '"\\u0000"',
    "'''multi\nline'''",
)


def toml_malform(seed: str, rng: random.Random) -> bytes:
    """A TOML-aware malformation, or a byte-level one from ``malform``."""
    lines = seed.splitlines()
    kind = rng.randrange(7)
    if kind == 0 and lines:
        del lines[rng.randrange(len(lines))]
    elif kind == 1 and lines:
        line = rng.choice(lines)
        lines.insert(rng.randrange(len(lines) + 1), line)
    elif kind == 2:
        assigned = [i for i, line in enumerate(lines) if " = " in line]
        if assigned:
            i = rng.choice(assigned)
            key = lines[i].split(" = ", 1)[0]
            lines[i] = f"{key} = {rng.choice(TOML_VALUES)}"
    elif kind == 3:
        lines.insert(rng.randrange(len(lines) + 1), f"{rng.choice(('x', 'tpm', 'a.b'))} = 1")
    elif kind == 4:
        depth = rng.choice((50, 400, 5000, 100_000))
        opener, closer = rng.choice((("[", "]"), ("{ a = ", " }")))
        lines.insert(rng.randrange(len(lines) + 1), f"deep = {opener * depth}1{closer * depth}")
    elif kind == 5:
        depth = rng.choice((50, 1000))
        lines.append("[" + ".".join(["t"] * depth) + "]")
    else:
        return malform([seed.encode()], rng, limit=1024 * 1024)
    return "\n".join(lines).encode()


def fuzz_config(
    path: Path, seed: str, load: Callable[[Path], object], files: Path
) -> tuple[Tally, Counter[str]]:
    before = tree_digest(files)
    tally = Tally()
    first_problem: Counter[str] = Counter()
    for n in range(INPUTS):
        path.write_bytes(toml_malform(seed, random.Random(n)))
        try:
            tally.timed(lambda: load(path))
        except ConfigError as refusal:
            tally.refused[type(refusal).__name__] += 1
            problems = getattr(refusal, "problems", [])
            head = str(problems[0]) if problems else str(refusal)
            first_problem[head.split(":", 1)[0].split(" ", 1)[0][:40]] += 1
            continue
        tally.accepted += 1
    path.write_text(seed)
    assert tree_digest(files) == before  # loading wrote nothing
    return tally, first_problem


def test_agent_configuration_meets_10000_malformed_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.pure.test_agent_config import _provisioned_toml

    files = agent_files(tmp_path / "pki")
    seed = _provisioned_toml(files)
    path = tmp_path / "agent.toml"
    path.write_text(seed)
    load_agent_config(path)  # the seed itself is good
    tally, problems = fuzz_config(path, seed, load_agent_config, tmp_path / "pki")
    assert tally.inputs == INPUTS and tally.total_refused >= INPUTS * 0.5
    with capsys.disabled():
        print(f"\nagent.config: {tally.summary()}; {problems.most_common(6)}")


def test_service_configuration_meets_10000_malformed_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.pure.test_service_config import FILES, GOOD

    for name, mode in FILES.items():
        file = tmp_path / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(f"contents of {name}\n")
        file.chmod(mode)
    path = tmp_path / "keyfleet.toml"
    path.write_text(GOOD)
    load_service_config(path)
    tally, problems = fuzz_config(path, GOOD, load_service_config, tmp_path / "pki")
    assert tally.inputs == INPUTS and tally.total_refused >= INPUTS * 0.5
    with capsys.disabled():
        print(f"\nprovisioning.config: {tally.summary()}; {problems.most_common(6)}")


def test_random_toml_values_in_every_key_are_refused_cleanly(tmp_path: Path) -> None:
    """Every key of the agent seed set to every value of the wire data model's random values
    (rendered as TOML where possible): a sweep, not random, so each key sees each type."""
    from tests.pure.test_agent_config import _provisioned_toml

    files = agent_files(tmp_path / "pki")
    seed = _provisioned_toml(files)
    path = tmp_path / "agent.toml"
    keys = [i for i, line in enumerate(seed.splitlines()) if " = " in line]
    rng = random.Random(7)
    tried = 0
    for i in keys:
        for value in [*TOML_VALUES, repr(random_value(rng))]:
            lines = seed.splitlines()
            lines[i] = f"{lines[i].split(' = ', 1)[0]} = {value}"
            path.write_text("\n".join(lines))
            with contextlib.suppress(ConfigError):
                load_agent_config(path)
            tried += 1
    assert tried >= len(keys) * len(TOML_VALUES)

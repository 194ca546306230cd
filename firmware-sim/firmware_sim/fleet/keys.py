"""The virtual devices' keys: ``SimulatedSoftwareKeys``, the ``agent.core.KeyProvider`` of a
virtual device. Its DevID key and every leaf key are software keys in this process's memory:
INSECURE, simulation only (a real device keeps both in its TPM). It is only built through the
agent's own gate on software keys (``agent.daemon.load_devid``). Its TPM-residency proofs come
from a software "AK" (``firmware_sim.fleet.credentials``, simulated the same way)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec

from agent.config import AgentConfig
from agent.daemon import load_devid
from agent.protocol.errors import StateError
from agent.protocol.hpke import serialize_public_key
from firmware_sim.fleet.credentials import SIMULATED_AK_FILE, SimulatedAK


class SimulatedSoftwareKeys:
    """``agent.core.KeyProvider`` for the virtual fleet: the DevID key and every leaf key are
    software keys in this process's memory. INSECURE, simulation only: nothing here is protected
    the way a TPM protects a device's keys. Built through ``from_config``, which applies the
    agent's own gate (``agent.daemon.load_devid``)."""

    def __init__(self, devid: ec.EllipticCurvePrivateKey, ak: SimulatedAK | None = None) -> None:
        self._devid = devid
        self._ak = ak
        self._leaves: dict[bytes, ec.EllipticCurvePrivateKey] = {}

    @classmethod
    def from_config(cls, config: AgentConfig, *, allow_insecure: bool) -> SimulatedSoftwareKeys:
        """The device's DevID key as its agent configuration names it. Refused (``ConfigError``)
        unless the configuration says ``simulation.insecure_software_keys = true`` and the caller
        passes ``allow_insecure`` (the explicit command-line flag). The software "AK" is the
        ``ak.key`` beside the DevID key, if the device has one (``prepare_identities`` makes it)."""
        devid = load_devid(None, config, allow_insecure)
        assert config.identity is not None  # load_devid refuses a configuration without one
        ak_path = config.identity.devid_key.parent / SIMULATED_AK_FILE
        return cls(devid, SimulatedAK.load(ak_path) if ak_path.exists() else None)

    def __repr__(self) -> str:
        return f"SimulatedSoftwareKeys({len(self._leaves)} leaves)"

    @property
    def devid(self) -> ec.EllipticCurvePrivateKey:
        return self._devid

    def new_leaf_key(self) -> ec.EllipticCurvePrivateKey:
        key = ec.generate_private_key(ec.SECP256R1())
        self._leaves[serialize_public_key(key.public_key())] = key
        return key

    def load_leaf(self, public: bytes) -> ec.EllipticCurvePrivateKey:
        key = self._leaves.get(public)
        if key is None:
            raise StateError("this virtual device does not hold that leaf key")
        return key

    def prove_leaf(self, public_point: bytes) -> bytes | None:
        """The leaf key's residency proof by the software "AK" (SIMULATED, see
        ``firmware_sim.fleet.credentials``); None for a device without one."""
        if self._ak is None:
            return None
        return self._ak.prove_leaf(self.load_leaf(public_point).public_key())

    def retain(self, live: set[bytes]) -> None:
        """Forget every leaf key the core no longer refers to (the TPM version shreds blobs)."""
        for public in [p for p in self._leaves if p not in live]:
            del self._leaves[public]

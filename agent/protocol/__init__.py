"""The sans-I/O protocol core the whole fleet speaks.

Everything under ``agent.protocol`` takes bytes, a clock reading and a random source and returns
bytes, values or raises: wire format (CBOR/COSE envelopes and message bodies), HPKE, the MLS
subset (TreeKEM, key schedule, the delivery service's public view), data sealing, key lifecycle
records, the measured-boot event log, TPM quote/certify structure parsing (unmarshalling only,
never a TPM command), topic names and the error tree. It imports nothing else of keyfleet: the
device daemon (``agent.*`` beside it), the fleet service (``provisioning``) and the simulator
(``firmware_sim``) build on it. The rule is a contract checked by ``make lint`` (import-linter,
``[tool.importlinter]`` in pyproject.toml).
"""

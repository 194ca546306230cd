"""keyagent: the device side of keyfleet, and the wire protocol the whole fleet speaks.

The protocol core (``agent.protocol``: wire, hpke, mls, TPM structure parsing, topics) is
sans-I/O: it takes bytes, a clock and a random source and returns bytes or actions. The TPM, MQTT,
serial link and files are thin adapters around it (docs/architecture.md).
"""

__version__ = "0.1.0"

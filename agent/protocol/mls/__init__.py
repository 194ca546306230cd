"""The MLS (RFC 9420) subset keyfleet uses: cipher suite 2 primitives, TLS-presentation helpers,
the key schedule, and (from the TreeKEM side) tree math and the ratchet tree.

Framing on the wire is keyfleet's own (CBOR/COSE); only what the RFC's test vectors pin down is
encoded the RFC's way, so the published vectors pass.
"""

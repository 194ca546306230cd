"""The wire layer: deterministic CBOR, COSE_Sign1, the envelope and its staged decoding, message
bodies, replay tracking. Sans-I/O: bytes, a clock and keys in; bytes or typed messages out."""

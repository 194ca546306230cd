"""The agent's TPM: key store (``store``, issues TPM commands), key blobs (``blob``), templates
(``templates``), the state counter (``nvcounter``), the rotating parents of leaf and init keys
(``parents``) and attestation verification (``agent.protocol.attest``, issues none)."""

from agent.protocol.attest import Attestation, CertifyInfo, QuoteInfo
from agent.tpm.blob import KeyBlob
from agent.tpm.store import TPMKey, TPMStore
from agent.tpm.templates import KeyKind

__all__ = ["Attestation", "CertifyInfo", "KeyBlob", "KeyKind", "QuoteInfo", "TPMKey", "TPMStore"]

"""The RFC 9420 §8 key schedule for cipher suite 2.

    init_secret[n-1] + commit_secret -> Extract -> ExpandWithLabel("joiner", GroupContext[n])
      = joiner_secret
    joiner_secret + psk_secret -> Extract = member secret
      -> DeriveSecret("welcome") = welcome_secret
      -> ExpandWithLabel("epoch", GroupContext[n]) = epoch_secret
    epoch_secret -> DeriveSecret(<label>) for each derived secret, and "init" for init_secret[n]

A Welcome joiner starts from joiner_secret (``epoch_from_joiner``); a member from its previous
init_secret (``derive_epoch``). Both give the same ``EpochSecrets``, whose fields never appear in
a repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.protocol.mls.crypto import NH, NK, NN, derive_secret, expand_with_label, extract, hash_
from agent.protocol.mls.tls import opaque_v, uint16, uint64

PROTOCOL_VERSION_MLS10 = 1
CIPHER_SUITE = 2


@dataclass(frozen=True)
class EpochSecrets:
    """Every secret of one epoch (RFC 9420 Table 4), plus the inputs' joiner/welcome secrets."""

    joiner_secret: bytes = field(repr=False)
    welcome_secret: bytes = field(repr=False)
    epoch_secret: bytes = field(repr=False)
    sender_data_secret: bytes = field(repr=False)
    encryption_secret: bytes = field(repr=False)
    exporter_secret: bytes = field(repr=False)
    external_secret: bytes = field(repr=False)
    confirmation_key: bytes = field(repr=False)
    membership_key: bytes = field(repr=False)
    resumption_psk: bytes = field(repr=False)
    epoch_authenticator: bytes = field(repr=False)
    init_secret: bytes = field(repr=False)


def derive_epoch(
    init_secret: bytes,
    commit_secret: bytes,
    group_context: bytes,
    psk_secret: bytes = bytes(NH),
) -> EpochSecrets:
    """The next epoch's secrets from the previous ``init_secret`` and this commit's
    ``commit_secret`` (all zeros when the commit has no path). ``group_context`` is the new
    epoch's GroupContext as encoded by ``group_context_bytes``."""
    joiner_secret = expand_with_label(
        extract(init_secret, commit_secret), b"joiner", group_context, NH
    )
    return epoch_from_joiner(joiner_secret, group_context, psk_secret)


def epoch_from_joiner(
    joiner_secret: bytes, group_context: bytes, psk_secret: bytes = bytes(NH)
) -> EpochSecrets:
    """The epoch's secrets from ``joiner_secret`` (what a Welcome delivers)."""
    member_secret = extract(joiner_secret, psk_secret)
    epoch_secret = expand_with_label(member_secret, b"epoch", group_context, NH)
    return EpochSecrets(
        joiner_secret=joiner_secret,
        welcome_secret=derive_secret(member_secret, b"welcome"),
        epoch_secret=epoch_secret,
        sender_data_secret=derive_secret(epoch_secret, b"sender data"),
        encryption_secret=derive_secret(epoch_secret, b"encryption"),
        exporter_secret=derive_secret(epoch_secret, b"exporter"),
        external_secret=derive_secret(epoch_secret, b"external"),
        confirmation_key=derive_secret(epoch_secret, b"confirm"),
        membership_key=derive_secret(epoch_secret, b"membership"),
        resumption_psk=derive_secret(epoch_secret, b"resumption"),
        epoch_authenticator=derive_secret(epoch_secret, b"authentication"),
        init_secret=derive_secret(epoch_secret, b"init"),
    )


def mls_exporter(exporter_secret: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """MLS-Exporter (§8.5) = ExpandWithLabel(DeriveSecret(exporter_secret, Label), "exported",
    Hash(Context), Length): the per-epoch data keys apps get come from here."""
    return expand_with_label(
        derive_secret(exporter_secret, label), b"exported", hash_(context), length
    )


def group_context_bytes(
    group_id: bytes,
    epoch: int,
    tree_hash: bytes,
    confirmed_transcript_hash: bytes,
    extensions: bytes = b"",
) -> bytes:
    """GroupContext (§8.1), TLS-encoded: version mls10, cipher_suite 2, group_id<V>, uint64
    epoch, tree_hash<V>, confirmed_transcript_hash<V>, extensions<V>. ``extensions`` is the
    already-encoded concatenation of Extension structs (empty for keyfleet); the <V> length
    prefix is added here."""
    return (
        uint16(PROTOCOL_VERSION_MLS10)
        + uint16(CIPHER_SUITE)
        + opaque_v(group_id)
        + uint64(epoch)
        + opaque_v(tree_hash)
        + opaque_v(confirmed_transcript_hash)
        + opaque_v(extensions)
    )


def welcome_key_nonce(welcome_secret: bytes) -> tuple[bytes, bytes]:
    """(welcome_key, welcome_nonce) = ExpandWithLabel(welcome_secret, "key"/"nonce", "", Nk/Nn),
    the AEAD key and nonce of a Welcome's GroupInfo (§12.4.3.1)."""
    return (
        expand_with_label(welcome_secret, b"key", b"", NK),
        expand_with_label(welcome_secret, b"nonce", b"", NN),
    )

"""Manufacturer CRLs on the service host: the file ``keyfleet pki import-crl`` writes and
enrollment reads (``[attestation] manufacturer_crls``).

Why a file named in the configuration and not a database table: the CRLs say which of the
manufacturer CAs' certificates are no longer to be trusted, so they belong with the bundle of
those CAs (``[attestation] manufacturer_cas``), a file on the service host. A database writer,
who is not trusted with the service host's files (docs/threat-model.md), could otherwise delete a
CRL row and un-revoke a TPM; with the file it cannot. The price: with several service instances
the file is copied to each, like the bundle and the configuration.

The file is a PEM bundle of CRLs, at most one per issuing CA (an import replaces that CA's older
CRL, never by an older one). Enrollment re-reads it whenever it changed (size or modification
time), so an import takes effect at the next enrollment, without a restart. The pure checks are
``provisioning.ekchain``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509

from agent.fsio import atomic_write
from agent.protocol.errors import ConfigError
from provisioning.ekchain import CheckedCRL, ManufacturerTrust, crls_from_bytes, crls_to_pem


def read_crls(path: Path | None) -> list[x509.CertificateRevocationList]:
    """The CRLs in ``path`` (none if it is None or does not exist yet)."""
    if path is None:
        return []
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read the manufacturer CRLs {path}: {exc.strerror}") from None
    return crls_from_bytes(data)


class ManufacturerTrustFile:
    """The manufacturer bundle with the CRL file as it is now: ``current()`` re-reads the file
    when it changed. Thread-safe (the enrollment API calls it from a thread pool)."""

    def __init__(self, bundle: Sequence[x509.Certificate], crl_path: Path | None) -> None:
        self._bundle = tuple(bundle)
        self._path = crl_path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._trust = ManufacturerTrust(self._bundle)

    def _file_stamp(self) -> tuple[int, int] | None:
        if self._path is None:
            return None
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> ManufacturerTrust:
        with self._lock:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._trust = ManufacturerTrust(self._bundle, read_crls(self._path))
                self._stamp = stamp
            return self._trust


def import_crl(
    bundle: Sequence[x509.Certificate], crl_path: Path, data: bytes, *, now: datetime
) -> list[CheckedCRL]:
    """Check the CRLs in ``data`` (signed by a CA of ``bundle`` allowed to sign CRLs, covering
    all its certificates, fresh at ``now``, not older than the one held for the same CA) and
    write them into ``crl_path`` in place of their CAs' older ones, atomically. Raises
    ``ProtocolError`` (``ek.crl.*``) and writes nothing if any of them is refused."""
    incoming = crls_from_bytes(data)
    if not incoming:
        raise ConfigError("no CRL in the file")
    trust = ManufacturerTrust(bundle, read_crls(crl_path))
    checked = [trust.merge(crl, now=now) for crl in incoming]
    atomic_write(crl_path, crls_to_pem(c.crl for c in trust.crls.values()), mode=0o644)
    return checked

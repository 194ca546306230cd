"""Certificates from untrusted bytes.

``cryptography`` parses a certificate whose serial number is not positive (which RFC 5280
forbids) with only a deprecation warning, and a later release will refuse it. Every certificate
a peer sends (an approval's operator certificate, a member's DevID credential, a trust bundle's
CA, a renewed certificate) is read here, so such a certificate is refused as not parsing, the
same ``ValueError`` the callers already turn into their own check ids, instead of a warning in
the logs (or an error where warnings are errors) and a certificate read on.
"""

from __future__ import annotations

import warnings

from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning


def load_certificate(der: bytes) -> x509.Certificate:
    """The certificate in ``der``; ``ValueError`` if it does not parse or ``cryptography`` warns
    that it will stop parsing it (``x509.InvalidVersion`` for a version outside 1..3, as
    ``cryptography`` raises)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        try:
            return x509.load_der_x509_certificate(der)
        except CryptographyDeprecationWarning as warned:
            raise ValueError(f"a certificate cryptography will refuse: {warned}") from None

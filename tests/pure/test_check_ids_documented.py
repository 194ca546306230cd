"""Every check id the code raises is documented (docs/checks.md or the component's page), so logs,
counters and alerts can be read against the docs. An id in code and nowhere in docs/ fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[2]
# a refusal: an exception (or refusing helper) whose first argument is a dotted lower-case id
RAISED = re.compile(
    r"\b(?:[A-Z][A-Za-z]*(?:Error|Refused|Conflict|Denied)|_refuse|refused|_reject)\(\s*"
    r"(?:check=)?\"([a-z][a-z0-9_-]*(?:\.[a-z0-9_-]+)+)\""
)


def _raised_ids() -> dict[str, str]:
    found: dict[str, str] = {}
    for package in ("agent", "provisioning", "firmware-sim"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for match in RAISED.finditer(path.read_text()):
                found.setdefault(match.group(1), str(path.relative_to(ROOT)))
    return found


def test_the_scan_finds_the_known_families() -> None:
    ids = _raised_ids()
    assert len(ids) > 150
    for family in ("cbor.", "cose.", "mls.", "tpm.", "attest.", "ds.", "enroll.", "serial."):
        assert any(i.startswith(family) for i in ids), family


def test_every_raised_check_id_is_documented() -> None:
    docs = "\n".join(p.read_text() for p in sorted((ROOT / "docs").rglob("*.md")))
    missing = {i: where for i, where in _raised_ids().items() if i not in docs}
    assert not missing, f"check ids raised but documented nowhere in docs/: {missing}"

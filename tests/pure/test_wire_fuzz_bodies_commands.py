"""Hypothesis: the second half of the body types (acks, service and operator commands, results)
meet 10,000 malformed inputs each; the generator lives in tests/pure/test_wire_fuzz_bodies.py."""

from __future__ import annotations

import pytest

from agent.protocol.wire.messages.base import Body
from tests.pure.test_wire_fuzz_bodies import SECOND_HALF, fuzz_body

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("cls", SECOND_HALF, ids=lambda c: c.__name__)
def test_body_parser_survives(cls: type[Body]) -> None:
    fuzz_body(cls)

"""agent.mqtt pieces that need no broker: backoff schedule, ack matching, message type."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent.mqtt import Backoff, MqttClient, MqttRefused, ReceivedMessage, _Completions
from agent.protocol.errors import ConfigError, TransportError

pytestmark = pytest.mark.pure


def test_backoff_is_exponential_and_capped() -> None:
    backoff = Backoff(initial=0.5, maximum=8.0, multiplier=2.0, jitter=lambda d: d)
    assert [backoff.delay(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff.delay(10_000) == 8.0  # no overflow after a week offline


def test_backoff_jitter_is_injected_and_default_stays_in_range() -> None:
    seen: list[float] = []

    def jitter(nominal: float) -> float:
        seen.append(nominal)
        return nominal / 4

    assert Backoff(initial=1.0, jitter=jitter).delay(2) == 1.0
    assert seen == [4.0]
    default = Backoff(initial=1.0, maximum=60.0)
    delays = {default.delay(3) for _ in range(50)}
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len(delays) > 1  # actually jittered


def test_negative_jitter_is_clamped() -> None:
    assert Backoff(jitter=lambda d: -1.0).delay(0) == 0.0


def test_completion_that_arrives_before_the_wait_is_kept() -> None:
    table = _Completions()
    since = time.monotonic_ns()
    table.complete("PUBACK", 7, "ok")
    assert table.wait("PUBACK", 7, since, timeout=0.1) == (True, "ok")
    # Consumed: a second wait for the same id finds nothing.
    assert table.wait("PUBACK", 7, since, timeout=0.01) == (False, None)


def test_stale_completion_for_a_reused_id_is_ignored() -> None:
    table = _Completions()
    table.complete("PUBACK", 7, "late ack of an abandoned publish")
    since = time.monotonic_ns()
    assert table.wait("PUBACK", 7, since, timeout=0.01) == (False, None)
    table.complete("PUBACK", 7, "fresh")
    assert table.wait("PUBACK", 7, since, timeout=0.1) == (True, "fresh")


def test_kinds_do_not_mix() -> None:
    table = _Completions()
    since = time.monotonic_ns()
    table.complete("SUBACK", 3, "sub")
    assert table.wait("PUBACK", 3, since, timeout=0.01) == (False, None)
    assert table.wait("SUBACK", 3, since, timeout=0.1) == (True, "sub")


def test_completion_from_another_thread_wakes_the_waiter() -> None:
    table = _Completions()
    since = time.monotonic_ns()
    timer = threading.Timer(0.05, table.complete, args=("PUBACK", 1, "ok"))
    timer.start()
    try:
        assert table.wait("PUBACK", 1, since, timeout=5) == (True, "ok")
    finally:
        timer.join()


def test_close_fails_waiters() -> None:
    table = _Completions()
    timer = threading.Timer(0.05, table.close)
    timer.start()
    try:
        with pytest.raises(TransportError, match="closed"):
            table.wait("PUBACK", 1, time.monotonic_ns(), timeout=5)
    finally:
        timer.join()


def test_received_message_repr_hides_payload() -> None:
    message = ReceivedMessage(
        topic="kf/v1/dev/dev-1/cmd",
        payload=b"sealed-bytes",
        qos=1,
        retain=False,
        duplicate=False,
        mid=1,
    )
    assert "sealed-bytes" not in repr(message)
    assert "kf/v1/dev/dev-1/cmd" in repr(message)


def test_refusal_names_the_reason_code() -> None:
    exc = MqttRefused("publish to kf/v1/x", 0x87, "Not authorized")
    assert isinstance(exc, TransportError)
    assert exc.reason_code == 0x87
    assert "0x87" in str(exc) and "Not authorized" in str(exc)


def test_unusable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n")
    with pytest.raises(ConfigError) as exc:
        MqttClient(
            host="127.0.0.1",
            port=1,
            ca_file=tmp_path / "missing-ca.pem",
            cert_file=tmp_path / "cert.pem",
            key_file=tmp_path / "key.pem",
            client_id="dev-1",
        )
    assert "missing-ca.pem" in str(exc.value)
    assert "c2VjcmV0" not in str(exc.value)


def test_empty_client_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="client_id"):
        MqttClient(
            host="127.0.0.1",
            port=1,
            ca_file=tmp_path / "ca.pem",
            cert_file=tmp_path / "c.pem",
            key_file=tmp_path / "k.pem",
            client_id="",
        )

"""The operator dashboard (docs/dashboard.md): read-only HTML pages over the registry, served by
``keyfleet serve`` on its own HTTPS listener (``[dashboard]``) whose TLS layer trusts only the
operator CA. ``start_dashboard(config)`` runs it in a thread; ``build_dashboard_app`` is the ASGI
application for tests and other servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine

from agent.protocol.errors import ConfigError
from provisioning import inventory, pki
from provisioning.config import ServiceConfig
from provisioning.dashboard.app import (
    CSP,
    DashboardSettings,
    OperatorGuard,
    build_dashboard_app,
)
from provisioning.db.engine import make_engine, session_factory
from provisioning.http import EnrollmentServer, start_mtls_server

# An event stream never ends by itself: a stop waits this long for open responses, then
# cancels them.
GRACEFUL_STOP_SECONDS = 2.0

__all__ = [
    "CSP",
    "DashboardServer",
    "DashboardSettings",
    "OperatorGuard",
    "build_dashboard_app",
    "start_dashboard",
]


@dataclass
class DashboardServer:
    """A running dashboard (uvicorn in a thread); ``stop()`` ends its event streams and it."""

    server: EnrollmentServer
    _stop: threading.Event = field(repr=False)
    _engine: Engine = field(repr=False)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        self._stop.set()
        self.server.stop()
        self._engine.dispose()

    def __enter__(self) -> DashboardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_dashboard(
    config: ServiceConfig,
    *,
    clock: Callable[[], float] = time.time,
    settings: DashboardSettings | None = None,
) -> DashboardServer:
    """Serve the dashboard on ``[dashboard] listen`` with mutual TLS against the operator CA;
    raises ``ConfigError`` if the configuration has no ``[dashboard]`` or the port is taken."""
    dashboard = config.dashboard
    if dashboard is None:
        raise ConfigError(f"{config.path}: no [dashboard] table: the dashboard is not configured")
    operator_ca = pki.cert_from_pem(config.operator_ca_cert.read_bytes())
    engine = make_engine(config.database_url)
    stop = threading.Event()
    app = build_dashboard_app(
        session_factory(engine),
        operator_ca=operator_ca,
        settings=settings or DashboardSettings(page_size=dashboard.page_size),
        clock=clock,
        stop=stop,
        fleet_keys=inventory.fleet_facts(config),
        min_approvals=config.quorum.min_approvals,
    )
    try:
        server = start_mtls_server(
            app,
            server_cert=dashboard.tls_cert,
            server_key=dashboard.tls_key,
            client_ca=config.operator_ca_cert,
            host=dashboard.host,
            port=dashboard.port,
            what="dashboard",
            graceful_timeout=GRACEFUL_STOP_SECONDS,
        )
    except BaseException:
        engine.dispose()
        raise
    return DashboardServer(server, stop, engine)

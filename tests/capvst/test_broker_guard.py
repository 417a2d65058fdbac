"""The broker guard for a Redis channel whose connection was already closed."""

from __future__ import annotations

from kombu import Connection

from capvst.broker import create_app
from capvst.settings import Settings


def test_closing_a_collected_connection_is_a_connection_error_not_a_crash():
    create_app(Settings())  # installs the guard
    conn = Connection("redis://127.0.0.1:1/0", transport_options={"max_retries": 0})
    chan = conn.transport.Channel.__new__(conn.transport.Channel)
    chan.connection = conn.transport
    conn.transport.client = None  # what Connection.collect() leaves behind
    try:
        chan._connparams()
    except conn.connection_errors as exc:
        assert "already closed" in str(exc)
    else:
        raise AssertionError("expected a connection error")

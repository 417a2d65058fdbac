"""An HTTP proxy that injects S3 faults in front of a real S3 server.

Requests are forwarded to the upstream server, except that a configurable share of them (or
those whose path matches a pattern) get a ``503 SlowDown``, a ``500 InternalError`` or a
reset connection instead. It runs in threads of the test process; capvst processes reach it
over TCP like any S3 endpoint.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("slowdown", "internal", "reset")

_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        "<Message>{msg}</Message><RequestId>fault</RequestId></Error>")


class FaultProxy:
    """``rate``: share of requests that fail; ``always``: a regex of paths that always fail."""

    def __init__(self, upstream_port: int, rate: float = 0.0, always: str | None = None,
                 faults: tuple[str, ...] = FAULTS, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.always = re.compile(always) if always else None
        self.faults = faults
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {f: 0 for f in FAULTS}
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                fault = proxy._pick(self.path)
                if fault == "reset":
                    # RST instead of a response: the client sees a connection reset
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault in ("slowdown", "internal"):
                    status, code = (503, "SlowDown") if fault == "slowdown" else (
                        500, "InternalError")
                    data = _XML.format(code=code, msg="injected fault").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "proxy-connection")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()
                with proxy.lock:
                    proxy.forwarded += 1

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _pick(self, path: str) -> str | None:
        with self.lock:
            if self.always is not None and self.always.search(path):
                fault = self.faults[self.counts_total() % len(self.faults)]
            elif self.rate and self.random.random() < self.rate:
                fault = self.random.choice(self.faults)
            else:
                return None
            self.counts[fault] += 1
            return fault

    def counts_total(self) -> int:
        return sum(self.counts.values())

    def start(self) -> FaultProxy:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

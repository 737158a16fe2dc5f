"""A TCP proxy in front of the S3 server that injects the faults object stores show in production.

Modes (switched at any time; a switch drops the open connections, so the next request meets it):
- `pass`: bytes flow both ways unchanged.
- `refuse`: every connection is closed as soon as it is accepted (the client sees a reset).
- `stall`: connections are accepted and held without an answer until the mode changes.
- `deny`: every request is read and answered `403 AccessDenied` (credentials revoked mid-job).

Independently, `hold(marker)` keeps every read (GET, HEAD) whose request line contains `marker`
(an object's key) from reaching the server until `release()`: a test holds the read of one input image, so the job
cannot finish before the test has done its part (a fault, a kill) however fast the rest runs.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter

DENIED = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
)
DENIED_BODY = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'


class FaultProxy:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "pass"
        self.seen: Counter[str] = Counter()  # connections met per mode
        self.held: bytes | None = None
        self.requests_held = 0
        self._changed = threading.Condition()
        self._open: set[socket.socket] = set()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: str) -> None:
        assert mode in ("pass", "refuse", "stall", "deny"), mode
        with self._changed:
            self.mode = mode
            for connection in list(self._open):
                _close(connection)
            self._open.clear()
            self._changed.notify_all()

    def hold(self, marker: bytes) -> None:
        with self._changed:
            self.held = marker

    def release(self) -> None:
        with self._changed:
            self.held = None
            self._changed.notify_all()

    def close(self) -> None:
        self.release()
        self.set("pass")
        _close(self._server)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with self._changed:
            mode = self.mode
            self.seen[mode] += 1
            while mode == "stall":
                self._changed.wait()
                mode = self.mode
            if mode == "refuse":
                _close(client)
                return
            self._open.add(client)
        if mode == "deny":
            _deny(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            _close(client)
            return
        with self._changed:
            self._open.add(upstream)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        self._forward_requests(client, upstream)

    def _forward_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        """`_pump` from client to server, holding the reads that `hold` names. Clients send one
        request at a time, so a read's request line starts a chunk. A mode switch closes the
        connection, and with it ends a hold."""
        try:
            while data := client.recv(65536):
                with self._changed:
                    if self._is_held(data):
                        self.requests_held += 1
                        while self._is_held(data) and client in self._open:
                            self._changed.wait()
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(upstream)

    def _is_held(self, data: bytes) -> bool:
        line = data.split(b"\r\n", 1)[0]
        return self.held is not None and line.startswith((b"GET ", b"HEAD ")) and self.held in line


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _deny(client: socket.socket) -> None:
    """Read one request, answer 403 (with S3's error body, except to HEAD), close.

    As S3 does: a request sent with `Expect: 100-continue` (botocore's uploads) is answered after
    its head, since its client sends the body only on "100 Continue" and would wait for it; other
    requests are answered after their Content-Length body.
    """
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(65536)
            if not chunk:
                return
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = 0 if headers.get(b"expect", b"").lower() == b"100-continue" else int(headers.get(b"content-length", 0))
        while len(body) < length:
            chunk = client.recv(65536)
            if not chunk:
                break
            body += chunk
        # An answer to HEAD has no body (its Content-Length is the body GET would get).
        client.sendall(DENIED % (len(DENIED_BODY), b"" if head.startswith(b"HEAD ") else DENIED_BODY))
        # A lingering close: closing with unread request bytes would reset the connection and
        # could destroy the answer before the client reads it.
        client.shutdown(socket.SHUT_WR)
        client.settimeout(2)
        while client.recv(65536):
            pass
    except OSError:
        pass
    finally:
        _close(client)


def _close(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()

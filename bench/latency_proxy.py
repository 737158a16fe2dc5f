"""A TCP proxy on loopback that delays every HTTP request by a fixed time, as an object store's
latency does (S3 answers each request in about 20-50 ms whatever its size).

Each connection is delayed on its own, so requests in flight on different connections overlap as
they would against S3: what a client gains by keeping several requests going shows.
"""

from __future__ import annotations

import socket
import threading
import time

REQUEST_STARTS = (b"GET ", b"PUT ", b"POST ", b"HEAD ", b"DELETE ")


class LatencyProxy:
    def __init__(self, target_port: int, delay_seconds: float) -> None:
        self.target_port = target_port
        self.delay_seconds = delay_seconds
        self.requests = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._forward, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._forward, args=(upstream, client, False), daemon=True).start()

    def _forward(self, source: socket.socket, sink: socket.socket, delay_requests: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if delay_requests and data.startswith(REQUEST_STARTS):
                    self.requests += 1
                    time.sleep(self.delay_seconds)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

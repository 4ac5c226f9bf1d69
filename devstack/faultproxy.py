"""A TCP proxy on loopback that can be taken down and brought back, for fault tests.

Some services lose their state when they stop (moto keeps S3 in memory), so an
outage of them is simulated in front of them: :meth:`FaultProxy.down` closes the
listening socket and every open connection, so clients see connection refused
and resets, exactly as when the service is gone; :meth:`FaultProxy.up` listens
again on the same port. ``delay_s`` holds every chunk of a request that long
before passing it on: a slow link or a slow server.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from devstack.services import free_port


class FaultProxy:
    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", *, delay_s: float = 0.0
    ) -> None:
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port: int = free_port()
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            lst = socket.socket()
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind(("127.0.0.1", self.port))
            lst.listen(64)
            self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            lst, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if lst is not None:
            with contextlib.suppress(OSError):
                lst.shutdown(socket.SHUT_RDWR)
            lst.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    close = down

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return  # taken down
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._listener is not lst:
                    client.close()
                    server.close()
                    return
                self._conns.update((client, server))
            for a, b, delay in ((client, server, self.delay_s), (server, client, 0.0)):
                threading.Thread(target=self._pump, args=(a, b, delay), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay_s: float = 0.0) -> None:
        try:
            while data := src.recv(65536):
                if delay_s:
                    time.sleep(delay_s)  # the injected slowness itself
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # one side is done: end the whole connection (enough for HTTP clients)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

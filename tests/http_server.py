"""A server app run by uvicorn on a thread, on an ephemeral loopback port, for tests."""

import socket
import threading
import time

import uvicorn


class ServerThread:
    """Serves an ASGI app on 127.0.0.1 (a port the system picks) until stopped; a context manager."""

    def __init__(self, app) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Shut down (the app's lifespan ends: its engine thread stops, its request log is written)."""
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self._socket.close()

    def __exit__(self, *exc) -> None:
        self.stop()

"""uvicorn with a bounded stop: how `--mode serve` (and the tests) run the app.

On SIGTERM or SIGINT uvicorn stops accepting connections, closes the idle ones and waits for the
requests in flight. `Server` bounds that wait: after `shutdown_timeout` seconds it calls `on_timeout`
(`--mode serve` stops the engine there, so every reply still running ends with the shutdown error: 503,
or an error event and [DONE] in a stream), gives those replies a moment to go out, then closes the
connections still open (a client still sending its request, or one that stopped reading). Unlike
uvicorn, it does not re-raise the signal once stopped, so the command can stop the model's process
and exit 0. A second SIGINT skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable

import uvicorn

log = logging.getLogger("sakimi_next.serve")

CLOSE_POLLS = 10  # after on_timeout, up to 10 x 50 ms for the last replies to go out


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, shutdown_timeout: float, on_timeout: Callable[[], None] | None = None):
        # uvicorn's own limit, a last resort behind ours (it cancels the requests' tasks, which logs them)
        config.timeout_graceful_shutdown = shutdown_timeout + 10
        super().__init__(config)
        self.shutdown_timeout, self.on_timeout = shutdown_timeout, on_timeout

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        loop = asyncio.get_running_loop()
        cutting: list[asyncio.Task] = []
        timer = loop.call_later(self.shutdown_timeout, lambda: cutting.append(loop.create_task(self._cut())))
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()
            for task in cutting:
                await task

    async def _cut(self) -> None:
        """The wait is over: end what is still running."""
        log.warning("%d connection(s) still open %g s after the stop signal (--shutdown-timeout): ending them",
                    len(self.server_state.connections), self.shutdown_timeout)
        if self.on_timeout is not None:
            await asyncio.to_thread(self.on_timeout)
        for _ in range(CLOSE_POLLS):
            if not self.server_state.connections:
                return
            await asyncio.sleep(0.05)
        for connection in list(self.server_state.connections):
            connection.transport.abort()  # uvicorn then tells the request's task that the client is gone


class BackgroundServer:
    """The app served from a thread, on a free port of `host` unless one is given (tests and
    benchmarks): `with BackgroundServer(app) as server: server.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, shutdown_timeout: float = 30.0,
                 on_timeout: Callable[[], None] | None = None):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = Server(uvicorn.Config(app, log_level="warning", lifespan="off"), shutdown_timeout, on_timeout)
        self.thread = None

    def __enter__(self) -> "BackgroundServer":
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        for _ in range(500):  # up to 10 s
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("the server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.socket.close()

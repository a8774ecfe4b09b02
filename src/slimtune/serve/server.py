"""Run the app under uvicorn in a background thread: beside the engine's loop on the main thread
(the CLI), or beside a started engine (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn


class BackgroundServer:
    """`with BackgroundServer(app) as server:` serves on 127.0.0.1:server.port until the block ends."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host
        self.port = port

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        # With port 0 the OS picked a free port: read it back from the listening socket.
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def serve_forever(app, host: str, port: int) -> None:
    """Serve `app` on host:port until interrupted: uvicorn in a background thread, the app's
    engine loop on this one, the thread that loaded the model (see `Engine.run`)."""
    with (
        BackgroundServer(app, host, port, log_level="info"),
        contextlib.suppress(KeyboardInterrupt),
    ):
        app.state.engine.run()

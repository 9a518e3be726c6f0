"""Running the app on uvicorn, with the graceful shutdown `pydiff serve` promises: on SIGTERM
(or Ctrl-C) new work gets 503 while queued and running requests finish; then uvicorn stops. A
second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import threading
import time

import uvicorn

from pydiff.serving.app import ServerState, create_app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, whose first exit signal drains the app before uvicorn shuts down."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float):
        super().__init__(config)
        self.pydiff_state = state
        self.drain_timeout_s = drain_timeout_s
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # a second signal: uvicorn's own (stop now on Ctrl-C)
            self.should_exit = True
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self._draining = True
        self.pydiff_state.begin_drain()
        threading.Thread(target=self._exit_when_idle, name="pydiff-drain", daemon=True).start()

    def drain_and_exit(self) -> None:
        """The same drain from another thread (tests, embedding)."""
        self.handle_exit(signal.SIGTERM, None)

    def _exit_when_idle(self) -> None:
        stop = time.monotonic() + self.drain_timeout_s
        while not self.pydiff_state.idle() and time.monotonic() < stop:
            time.sleep(0.05)
        self.should_exit = True


def make_server(models, *, host="127.0.0.1", port=8000, log_level="info", **options) -> DrainingServer:
    """A server for `models` (see `create_app`) on host:port; `.run()` serves until a signal."""
    app = create_app(models, **options)
    state = app.state.pydiff
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", timeout_graceful_shutdown=30
    )
    return DrainingServer(config, state, drain_timeout_s=state.timeout_s + 30.0)


class BackgroundServer:
    """A server on a thread (tests, notebooks): `url`, `state`, `stop()`; port 0 picks a free one."""

    def __init__(self, models, *, host="127.0.0.1", port=0, ready_timeout_s=60.0, **options):
        self.server = make_server(models, host=host, port=port, log_level="warning", **options)
        self.state = self.server.pydiff_state
        self.thread = threading.Thread(target=self.server.run, name="pydiff-serve", daemon=True)
        self.thread.start()
        stop = time.monotonic() + ready_timeout_s
        while not (self.server.started and self.state.status != "loading"):
            if time.monotonic() > stop or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start ({self.state.status}: {self.state.load_error})")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{host}:{port}"

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def serve(models, **kwargs) -> None:
    """Serve `models` until SIGTERM / Ctrl-C (keywords: `make_server`'s)."""
    make_server(models, **kwargs).run()


__all__ = ["DrainingServer", "BackgroundServer", "make_server", "serve"]

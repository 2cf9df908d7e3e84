"""Running the app under uvicorn: in the foreground (the CLI) or in a thread (tests, scripts).

Shutdown (Ctrl-C, SIGTERM, or stop()): every job is cancelled first, so each open stream gets its final
event (response.failed / finish_reason) before uvicorn closes the connections; then the model thread stops.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from .app import Settings, create_app
from .worker import Worker


class _Uvicorn(uvicorn.Server):
    def __init__(self, config, app):
        super().__init__(config)
        self._gptoss_app = app

    def handle_exit(self, sig, frame):  # first the jobs, so streams can still say goodbye
        self._gptoss_app.state.stopping.set()
        self._gptoss_app.state.worker.cancel_all()
        super().handle_exit(sig, frame)
        # a signal that stopped the server cleanly is not re-raised at the end (uvicorn would): exit status 0
        getattr(self, "_captured_signals", []).clear()


def make_server(worker: Worker, settings: Settings, host: str, port: int, *, log_level: str = "warning",
                grace: float = 5.0) -> _Uvicorn:
    app = create_app(worker, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=grace,
                            lifespan="off", access_log=False)
    return _Uvicorn(config, app)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A server on 127.0.0.1 in a background thread: `with ServerThread(gpt_or_loader, ...) as s: s.url`."""

    def __init__(self, load, *, model_id: str = "gpt-oss", port: int | None = None, slots: int | None = None,
                 max_queue: int = 16, max_batch: int | None = None, api_key: str | None = None, cors=(),
                 max_body: int = 16 << 20, timeout: float = 120.0):
        self.worker = Worker(load, slots=slots, max_queue=max_queue, max_batch=max_batch)
        self.port = port or free_port()
        self.settings = Settings(model_id, api_key=api_key, cors=list(cors), max_body=max_body)
        self.timeout = timeout
        self.server = None
        self.thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def app(self):
        return self.server.config.app

    def start(self) -> "ServerThread":
        self.worker.start(self.timeout)
        self.server = make_server(self.worker, self.settings, "127.0.0.1", self.port)
        self.thread = threading.Thread(target=self.server.run, name="gptoss-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise RuntimeError(f"the server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if self.server is not None:
            self.app.state.stopping.set()
            self.worker.cancel_all()
            self.server.should_exit = True
            if self.thread is not None:
                self.thread.join(timeout)
        self.worker.shutdown(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

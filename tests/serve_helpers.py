"""Start `slimtune serve` for real (a subprocess on a free loopback port) and talk to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from helpers import OFFLINE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`slimtune serve MODEL_DIR --port P ...` in a subprocess; its output goes to a file (`log()`)."""

    def __init__(self, model_dir, *args, token: str | None = None, env: dict | None = None, cwd=None):
        self.port, self.token = free_port(), token
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        environment = {**os.environ, **OFFLINE, **(env or {})}
        environment.pop("SLIMTUNE_TOKEN", None)
        if token:
            environment["SLIMTUNE_TOKEN"] = token
        self.proc = subprocess.Popen([sys.executable, "-m", "slimtune", "serve", str(model_dir), "--port",
                                      str(self.port), "--threads", "1", *map(str, args)],
                                     stdout=self.output, stderr=subprocess.STDOUT, env=environment, cwd=cwd)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not come up:\n{self.log()[-3000:]}")

    def headers(self, token: str | None = "default") -> dict:
        token = self.token if token == "default" else token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def get(self, path: str, token: str | None = "default", **kw):
        return requests.get(self.url + path, headers=self.headers(token), timeout=kw.pop("timeout", 60), **kw)

    def post(self, path: str, body=None, token: str | None = "default", **kw):
        return requests.post(self.url + path, json=body, headers=self.headers(token),
                             timeout=kw.pop("timeout", 60), **kw)

    def log(self) -> str:
        self.output.flush()
        return Path(self.output.name).read_text(errors="replace")

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

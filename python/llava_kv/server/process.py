"""``llava-kv serve`` as a child process on 127.0.0.1 (tests, benchmarks, scripts that want one):
``with ServerProcess(model, mmproj, args=["--slots", "4"]) as srv: srv.client()``; :class:`ChildServer`
is the process handling it shares with the benchmarks' llama-server peer."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChildServer:
    """An HTTP server run as a child process in its own process group, healthy once ``GET
    health_path`` answers 200: ``start()`` waits for that, ``stop()`` is SIGTERM then SIGKILL,
    ``kill()`` SIGKILL at once (no cleanup at all). Subclasses set ``cmd``, ``base`` and ``log`` in
    their constructor."""

    name = "server"
    error: type[Exception] = RuntimeError  # what start() raises
    stop_timeout = 20.0
    cmd: list[str]
    base: str
    log: Path
    start_timeout: float = 120
    health_path = "/health"
    env: Optional[dict[str, str]] = None
    proc: Optional[subprocess.Popen[bytes]] = None

    def __enter__(self) -> "ChildServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def log_excerpt(self) -> str:
        """What start()'s error quotes of the log."""
        try:
            return self.log.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)  # own group: stop() ends all of it
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.error(f"{self.name} exited with {self.proc.returncode} while loading: {self.log_excerpt()}")
            try:
                with urllib.request.urlopen(self.base + self.health_path, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise self.error(f"{self.name} did not become healthy within {self.start_timeout} s: {self.log_excerpt()}")

    def stop(self, timeout: Optional[float] = None) -> Optional[int]:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class ServerProcess(ChildServer):
    """``llava-kv serve`` on 127.0.0.1 with a free port."""

    name = "llava-kv serve"

    def __init__(self, model: str | os.PathLike[str], mmproj: str | os.PathLike[str] | None = None, *,
                 args: Optional[list[str]] = None, api_key: Optional[str] = None, start_timeout: float = 120,
                 env: Optional[dict[str, str]] = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.cmd = [sys.executable, "-c", "import sys; from llava_kv.cli import main; sys.exit(main())", "serve",
                    "--model", os.fspath(model), "--port", str(self.port)]
        if mmproj is not None:
            self.cmd += ["--mmproj", os.fspath(mmproj)]
        if api_key:
            self.cmd += ["--api-key", api_key]
        self.cmd += args or []
        self.env = dict(os.environ, **(env or {}))
        self.log = Path(tempfile.mkstemp(prefix="llava-kv-serve-", suffix=".log")[1])
        self.start_timeout = start_timeout

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=self.api_key or "none", max_retries=0, **kwargs)

    def get(self, path: str, headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, headers=self._headers(headers))
        return self._send(req)

    def post(self, path: str, body: bytes | dict[str, Any],
             headers: Optional[dict[str, str]] = None) -> tuple[int, dict[str, str], bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **self._headers(headers)})
        return self._send(req)

    def _headers(self, headers: Optional[dict[str, str]]) -> dict[str, str]:
        if headers is not None:
            return headers
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @staticmethod
    def _send(req: urllib.request.Request) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def metrics(self) -> dict[str, float]:
        from .metrics import parse

        status, _, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}: {body[:200]!r}")
        return parse(body.decode())

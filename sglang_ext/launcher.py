"""Start a real `python -m sglang.launch_server` as a subprocess and talk to it over HTTP.

Used by the tests, the demo and the benchmarks. On the CPU platform the server is launched with
SGLANG_PLATFORM=torch_cpu and --device cpu; each server gets a free local port, its own process group
(torn down with everything it spawned), and a log file that is kept when something goes wrong.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    pass


@dataclass
class SGLangServer:
    """A running server. Use `launch_server(...)` as a context manager."""
    model_path: Path
    port: int
    log_path: Path
    process: subprocess.Popen
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n_chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "<no log>"

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return json.loads(raw) if raw.strip() else {}
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} -> HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from e

    def get_text(self, path: str, timeout: float = 60) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return resp.read().decode()

    def generate(self, text: str, images: list | None = None, max_new_tokens: int = 32,
                 ignore_eos: bool = True, timeout: float = 600) -> dict:
        """Greedy /generate. `images`: PIL images or file paths; the text must hold one image placeholder
        (<|vision_start|><|image_pad|><|vision_end|>) per image."""
        body: dict = {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                                        "ignore_eos": ignore_eos}}
        if images:
            body["image_data"] = [image_to_data_url(im) for im in images]
        return self.post("/generate", body, timeout=timeout)


def image_to_data_url(image) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def cpu_server_args(*, dtype: str = "float32", max_total_tokens: int = 16384) -> list[str]:
    """Arguments that make SGLang serve on the torch_cpu platform in little memory."""
    return ["--device", "cpu", "--dtype", dtype, "--max-total-tokens", str(max_total_tokens),
            "--max-running-requests", "16", "--mem-fraction-static", "0.5"]


def dflash_args(draft_path: Path, block_size: int | None = None) -> list[str]:
    args = ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path", str(draft_path)]
    if block_size is not None:
        args += ["--speculative-num-draft-tokens", str(block_size)]
    return args


class launch_server:
    """Context manager: start the server, wait until it answers, yield `SGLangServer`, tear it down.

        with launch_server(model, extra_args=dflash_args(draft), log_dir=tmp) as server:
            server.generate("...")
    """

    def __init__(self, model_path: Path, extra_args: list[str] | None = None, *, log_dir: Path,
                 cpu: bool = True, env: dict | None = None, startup_timeout: float = 600,
                 name: str = "server"):
        self.model_path = Path(model_path)
        self.extra_args = list(extra_args or [])
        self.log_dir = Path(log_dir)
        self.cpu = cpu
        self.env = env or {}
        self.startup_timeout = startup_timeout
        self.name = name
        self.server: SGLangServer | None = None

    def __enter__(self) -> SGLangServer:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        args = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(self.model_path),
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]
        if self.cpu:
            args += cpu_server_args()
        args += self.extra_args
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)      # set by the kernel tests for themselves; never for servers
        if self.cpu:
            env["SGLANG_PLATFORM"] = "torch_cpu"
        env.update(self.env)
        log_path = self.log_dir / f"{self.name}-{port}.log"
        log = open(log_path, "w")
        log.write("$ " + " ".join(args) + "\n")
        log.flush()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.server = SGLangServer(self.model_path, port, log_path, proc, args)
        try:
            self._wait_ready()
        except BaseException:
            self._stop()
            raise
        return self.server

    def _wait_ready(self) -> None:
        server = self.server
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise ServerError(f"SGLang server exited with code {server.process.returncode} during startup; "
                                  f"log {server.log_path}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=5) as resp:
                    if resp.status == 200 and "fired up and ready" in server.log_tail(200_000):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise ServerError(f"SGLang server not ready after {self.startup_timeout:.0f}s; log {server.log_path}:\n"
                          f"{server.log_tail()}")

    def _stop(self) -> None:
        proc = self.server.process
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop()
        if exc_type is None and os.environ.get("SGLANG_EXT_KEEP_LOGS") != "1":
            self.server.log_path.unlink(missing_ok=True)     # keep logs only when something failed
        elif exc_type is not None:
            sys.stderr.write(f"\n--- SGLang log kept at {self.server.log_path} ---\n{self.server.log_tail()}\n")

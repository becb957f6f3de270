"""Start a real `python -m sglang.launch_server` as a subprocess and talk to a server over HTTP.

    with launch_server(target, draft_args(draft, block_size=4), log_dir=logs) as server:   # a new server
        server.generate("...")
    SGLangClient("http://host:30000").post("/generate", {...})                                # a running one

Used by the served evaluator (`trainer.evaluate --served`), the demo, the benchmarks and the tests. On the
CPU platform the server is launched with SGLANG_PLATFORM=torch_cpu and --device cpu; each server gets a free
local port, its own process group (torn down with everything it spawned), and a log file that is kept when
something goes wrong. `metric_value` reads one metric out of SGLang's Prometheus `/metrics` text.
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
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STOP_TIMEOUT_S = 60          # a stopping server's processes get this long after SIGTERM before SIGKILL


def group_alive(pgid: int) -> bool:
    """Does a process of process group `pgid` still run (zombies aside)?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    try:
        import psutil
        return any(p.status() != psutil.STATUS_ZOMBIE for p in psutil.process_iter()
                   if _pgid(p.pid) == pgid)
    except Exception:                       # noqa: BLE001 - without psutil: killpg said someone is there
        return True


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


class ServerError(RuntimeError):
    pass


class StartupHang(ServerError):
    """The server neither exited nor became ready in time; `report`: its process tree's Python stacks + log tail."""

    def __init__(self, message: str, report: str, report_path: Path):
        super().__init__(message)
        self.report, self.report_path = report, report_path


STARTUP_HANGS: list[str] = []      # reports of every start that hung in this process (the test session prints them)


def process_stacks(pid: int, timeout: float = 30) -> str:
    """Each process under `pid` (itself, its descendants and its process group): name, state, CPU seconds, and
    its Python threads' stacks (`py-spy dump`, when py-spy is on PATH)."""
    import shutil

    try:
        import psutil
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
        seen = {p.pid for p in procs}
        for p in psutil.process_iter():     # its process group too: processes started detached (the recorder)
            try:
                if p.pid not in seen and os.getpgid(p.pid) == pid:
                    procs.append(p)
            except (psutil.Error, ProcessLookupError):
                pass
    except Exception as e:                  # noqa: BLE001 - diagnosis must not raise
        return f"(no process tree: {e})"
    py_spy = shutil.which("py-spy")
    out = []
    for p in procs:
        try:
            cpu = p.cpu_times()
            out.append(f"=== pid {p.pid} {p.name()} state={p.status()} cpu user {cpu.user:.1f}s sys "
                       f"{cpu.system:.1f}s: {' '.join(p.cmdline())[:160]}")
        except Exception as e:              # noqa: BLE001
            out.append(f"=== pid {p.pid}: {e}")
            continue
        if py_spy:
            try:
                dump = subprocess.run([py_spy, "dump", "--pid", str(p.pid)], capture_output=True, text=True,
                                      timeout=timeout)
                out.append((dump.stdout or dump.stderr).strip())
            except (subprocess.TimeoutExpired, OSError) as e:
                out.append(f"(py-spy dump failed: {e})")
    if not py_spy:
        out.append("(py-spy not on PATH: no stacks)")
    return "\n".join(out)


class SGLangClient:
    """HTTP client of one SGLang server (JSON in, JSON out; HTTP errors carry the server's detail)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return json.loads(raw) if raw.strip() else {}
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {self.url}{path} -> HTTP {e.code}: "
                              f"{e.read().decode(errors='replace')[:2000]}") from e

    def get_text(self, path: str, timeout: float = 60) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
            return resp.read().decode()

    def metrics(self) -> str:
        """The Prometheus text of /metrics (needs --enable-metrics; --online-train turns it on)."""
        return self.get_text("/metrics")

    def generate(self, text: str, images: list | None = None, max_new_tokens: int = 32,
                 ignore_eos: bool = True, timeout: float = 600, custom_params: dict | None = None) -> dict:
        """Greedy /generate. `images`: PIL images or file paths; the text must hold one image placeholder
        (<|vision_start|><|image_pad|><|vision_end|>) per image. `custom_params`: SGLang's per-request field
        (e.g. {"online_train_opt_out": True} keeps the request out of --online-train)."""
        body: dict = {"text": text, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                                        "ignore_eos": ignore_eos}}
        if custom_params:
            body["sampling_params"]["custom_params"] = dict(custom_params)
        if images:
            body["image_data"] = [image_to_data_url(im) for im in images]
        return self.post("/generate", body, timeout=timeout)


class SGLangServer(SGLangClient):
    """A server this process started. Use `launch_server(...)` as a context manager."""

    def __init__(self, model_path: Path, port: int, log_path: Path, process: subprocess.Popen,
                 args: list[str] | None = None):
        super().__init__(f"http://127.0.0.1:{port}")
        self.model_path, self.port, self.log_path, self.process = model_path, port, log_path, process
        self.args = list(args or [])

    def log_tail(self, n_chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "<no log>"


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of metric `name` (exact name, e.g. "sglang:online_train_swaps_total") whose labels
    include `labels`, in Prometheus exposition text; 0.0 when there is none."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


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


def draft_args(draft_path: str | os.PathLike, block_size: int | None = None) -> list[str]:
    """Arguments that serve the draft at `draft_path` with speculative decoding of its kind (from its config)."""
    from trainer.draft_kind import kind_for_draft
    return kind_for_draft(draft_path).server_args(draft_path, block_size)


class launch_server:
    """Context manager: start the server, wait until it answers, yield `SGLangServer`, tear it down.

        with launch_server(model, extra_args=dflash_args(draft), log_dir=tmp) as server:
            server.generate("...")
    """

    def __init__(self, model_path: Path, extra_args: list[str] | None = None, *, log_dir: Path,
                 cpu: bool = True, env: dict | None = None, startup_timeout: float = 480,
                 name: str = "server", hang_retries: int = 1):
        self.model_path = Path(model_path)
        self.extra_args = list(extra_args or [])
        self.log_dir = Path(log_dir)
        self.cpu = cpu
        self.env = env or {}
        self.startup_timeout = startup_timeout
        self.name = name
        self.hang_retries = hang_retries      # a start that hangs (no exit, never ready) is diagnosed, then retried
        self.server: SGLangServer | None = None

    def __enter__(self) -> SGLangServer:
        for attempt in range(self.hang_retries + 1):
            try:
                return self._start()
            except StartupHang as hang:
                STARTUP_HANGS.append(hang.report)
                if attempt == self.hang_retries:
                    raise
                sys.stderr.write(f"\nsglang_ext.launcher: {self.name} hung at startup, starting it again; "
                                 f"diagnosis in {hang.report_path}\n")
        raise AssertionError("unreachable")

    def _start(self) -> SGLangServer:
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
                                  f"log {server.log_path}:\n{server.log_tail(3000)}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=5) as resp:
                    if resp.status == 200 and "fired up and ready" in server.log_tail(200_000):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        report_path = server.log_path.with_suffix(".hang.txt")
        report = (f"{self.name}: not ready after {self.startup_timeout:.0f}s (log {server.log_path})\n"
                  f"{process_stacks(server.process.pid)}\n--- last lines of the log ---\n{server.log_tail(2500)}")
        report_path.write_text(report)
        raise StartupHang(f"SGLang server not ready after {self.startup_timeout:.0f}s; log {server.log_path}, "
                          f"stacks and log tail in {report_path}:\n{report[-6000:]}", report, report_path)

    def _stop(self) -> None:
        """SIGTERM to the server's process group (every process of it: --online-train's recorder writes what it
        holds and exits), then wait for all of them; SIGKILL to the group after STOP_TIMEOUT_S."""
        proc = self.server.process
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline and group_alive(proc.pid):
            proc.poll()                        # reap the launcher; the others belong to it or to init
            time.sleep(0.2)
        if group_alive(proc.pid):
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

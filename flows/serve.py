"""Start/stop a local Prefect server + process worker and register the deployments of ``prefect.yaml``.

``make serve`` / ``make stop`` and the integration test use this. Processes are tracked by PID files in
``$PREFECT_HOME`` so ``stop`` ends only what ``start`` began. The worker ignores SIGTERM, so both are
stopped with SIGINT (then SIGKILL after a grace period).
"""

from __future__ import annotations

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

import typer

ROOT = Path(__file__).resolve().parents[1]
POOL = "cloudfree-process"
EE_TAG = "earthengine"
EE_TAG_LIMIT = 8

cli = typer.Typer(add_completion=False, help="Local Prefect server + worker for cloudfree.")


def prefect_home() -> Path:
    home = Path(os.environ.get("PREFECT_HOME", ROOT / ".prefect"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def _state_file() -> Path:
    return prefect_home() / "cloudfree-serve.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(prefect_home()),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PREFECT_CLI_PROMPT="false",
        CLOUDFREE_ROOT=str(ROOT),
        # The worker's own lines (flow run submitted, process exited) in worker.log and the UI; the flow runs get
        # INFO from prefect.yaml's job variables either way. A WARNING inherited from a shell or CI hid both.
        PREFECT_LOGGING_LEVEL="INFO",
    )
    return env


def _prefect(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("prefect")
    return subprocess.run([str(exe), *args], env=env, cwd=ROOT, check=check, capture_output=True, text=True)


def _wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"prefect server exited with code {proc.returncode}; see {prefect_home() / 'server.log'}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"prefect server did not answer {url} within {timeout:.0f} s; see {prefect_home() / 'server.log'}"
    )


def start(port: int | None = None, deploy: bool = True) -> dict:
    """Start server and worker (if not already running) and deploy everything in prefect.yaml."""
    state = read_state()
    if state and all(_alive(state[k]) for k in ("server_pid", "worker_pid")):
        return state
    if state:  # half of an earlier start is still up (or only its state file is left): end it first
        stop()
    port = port or free_port()
    try:
        return _start(port, deploy)
    except BaseException:
        stop()  # never leave a server or worker behind a failed start
        raise


def _start(port: int, deploy: bool) -> dict:
    env = server_env(port)
    home = prefect_home()
    exe = str(Path(sys.executable).with_name("prefect"))
    server = subprocess.Popen(
        [exe, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        env=env, cwd=ROOT, stdout=open(home / "server.log", "ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    state = {"port": port, "api_url": env["PREFECT_API_URL"], "server_pid": server.pid, "worker_pid": None}
    _write_state(state)
    _wait_healthy(port, server)
    # Remember the API URL in the project's profile so later `prefect ...` calls (same PREFECT_HOME) find it.
    _prefect("config", "set", f"PREFECT_API_URL={env['PREFECT_API_URL']}", env=env)
    if _prefect("work-pool", "inspect", POOL, env=env, check=False).returncode != 0:
        _prefect("work-pool", "create", POOL, "--type", "process", env=env)
    # Earth Engine quotas: tasks tagged 'earthengine' run at most EE_TAG_LIMIT at a time.
    _prefect("concurrency-limit", "create", EE_TAG, str(EE_TAG_LIMIT), env=env, check=False)
    worker = subprocess.Popen(
        [exe, "worker", "start", "--pool", POOL, "--type", "process"],
        env=env, cwd=ROOT, stdout=open(home / "worker.log", "ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    state["worker_pid"] = worker.pid
    _write_state(state)
    if deploy:
        out = _prefect(
            "deploy", "--all", "--prefect-file", str(ROOT / "prefect.yaml"), "--no-prompt", env=env, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"prefect deploy failed:\n{out.stdout}\n{out.stderr}")
    return state


def _alive(pid: int | None) -> bool:
    """The PID runs and is still a prefect process (a recycled PID of something else is left alone)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # Linux: check what the PID is now; elsewhere trust the state file
        try:
            return b"prefect" in cmdline.read_bytes()
        except OSError:
            return False
    return True


def _stop_pid(pid: int | None, grace: float = 20.0) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def stop() -> None:
    """Stop the worker, then the server, by the PIDs ``start`` recorded."""
    state = read_state()
    if not state:
        return
    _stop_pid(state.get("worker_pid"))
    _stop_pid(state.get("server_pid"))
    env = dict(os.environ, PREFECT_HOME=str(prefect_home()))
    env.pop("PREFECT_API_URL", None)
    # Without this, later ephemeral runs (make demo) would try to reach the stopped server.
    _prefect("config", "unset", "PREFECT_API_URL", "-y", env=env, check=False)
    _state_file().unlink(missing_ok=True)


def read_state() -> dict | None:
    f = _state_file()
    return json.loads(f.read_text()) if f.exists() else None


def _write_state(state: dict) -> None:
    tmp = _state_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(_state_file())


@cli.command("start")
def start_cmd(port: int = typer.Option(4200, help="Server port (0: any free one).")) -> None:
    try:
        state = start(port or None)
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        f"Prefect server at {state['api_url'].removesuffix('/api')} (pid {state['server_pid']}), worker pid "
        f"{state['worker_pid']}"
    )
    typer.echo(f"export PREFECT_API_URL={state['api_url']}  # or PREFECT_HOME={prefect_home()}, whose profile has it")
    typer.echo("then: prefect deployment run 'reconstruct-aoi/default' --watch")
    typer.echo("its log (INFO, a line per block): prefect flow-run logs <flow run id>, or the run's page in the UI")


@cli.command("stop")
def stop_cmd() -> None:
    stop()
    typer.echo("stopped")


if __name__ == "__main__":
    cli()

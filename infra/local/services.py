"""Start and stop the local services of tests and the demo: a Ray head node, a moto S3 server, an
MLflow server. Each runs in its own process session, bound to 127.0.0.1, and is stopped by its PID
(never `ray stop`: other people's Ray processes share the machine).

    python infra/local/services.py up --state STATE.json [--ray] [--s3] [--mlflow [--mlflow-root DIR]]
    python infra/local/services.py down --state STATE.json

`up` writes addresses and PIDs to STATE.json and prints `export NAME=VALUE` lines for a shell; run again,
it keeps the services that still run and starts the missing ones. `down` stops exactly what STATE.json
lists. With --mlflow-root the MLflow store outlives `down` (the demo's runs, so a rerun skips stages).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: ray, moto_server and mlflow come from it


def free_port(avoid: range = range(0)) -> int:
    """A port free now on 127.0.0.1, outside `avoid` (e.g. a range already handed to Ray's workers)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, token: str | None = None) -> None:
    """Until `url` answers (with `token` as a bearer token, when given) or `proc` exits."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a service, with `extra` on top: Ray auth off unless `extra` says otherwise,
    and no Ray address: Ray's CLI takes $RAY_ADDRESS over its --address flag (`ray start --address`, `ray list
    --address`), so a node started from a shell pointing at another cluster (CI's own head) would join that one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env = {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@dataclass
class Service:
    name: str
    pid: int
    env: dict[str, str] = field(default_factory=dict)  # what clients need, e.g. RAY_ADDRESS
    cleanup: list[str] = field(default_factory=list)  # directories removed on stop


def start_ray_head(num_cpus: int = 2, log: Path | None = None, attempts: int = 2, *,
                   env: dict[str, str] | None = None, resources: dict[str, float] | None = None,
                   auth_token: str | None = None) -> Service:
    """`ray start --head --block` in a new session; every port chosen free, dashboard on 127.0.0.1.

    `env`: the node's own environment on top of this process's (credentials the cluster's jobs use live here,
    never in a job's runtime env); `resources`: custom resources of the node; `auth_token`: Ray token auth on,
    with this token (clients need RAY_AUTH_MODE=token and RAY_AUTH_TOKEN: both are in the service's env). A
    start that fails (a port taken between choosing and binding it) is retried with new ports.
    """
    extra = dict(env or {})
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token} if auth_token else {}
    for attempt in range(attempts):
        try:
            head = _start_ray_node(None, num_cpus=num_cpus, log=log, env={**extra, **auth}, resources=resources,
                                   token=auth_token)
            head.env.update(auth)  # what clients need besides the address
            return head
        except RuntimeError as e:
            if attempt == attempts - 1:
                raise
            print(f"ray head did not start ({e}); retrying with other ports", file=sys.stderr)
    raise AssertionError("unreachable")


def start_ray_node(head: Service, *, num_cpus: int = 1, log: Path | None = None, env: dict[str, str] | None = None,
                   resources: dict[str, float] | None = None) -> Service:
    """Another node of `head`'s cluster on this machine: `ray start --address --block` in a new session, stopped
    by its PID like the head. It holds one unit of its own resource HDM_RAY_NODE_RESOURCE (in its env), by
    which a test can place work on it."""
    marker = f"hdm_node_{uuid.uuid4().hex[:8]}"
    node = _start_ray_node(head.env["RAY_ADDRESS"], num_cpus=num_cpus, log=log, env=dict(env or {}),
                           resources={**(resources or {}), marker: 1}, token=None,
                           dashboard=head.env["HDM_RAY_DASHBOARD"])
    node.env["HDM_RAY_NODE_RESOURCE"] = marker
    return node


def _ray_ports(head: bool) -> tuple[range, list[str]]:
    """(worker port range, port flags) of one Ray node: every port free now and outside the worker range."""
    low = free_port()
    workers = range(low, low + 201)  # Ray's worker ports: no other port of the node may fall inside
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port"]
    if head:
        names += ["port", "dashboard-port", "ray-client-server-port"]
    flags = [f"--{name}={free_port(workers)}" for name in names]
    return workers, [*flags, f"--min-worker-port={low}", f"--max-worker-port={low + 200}"]


def _start_ray_node(address: str | None, *, num_cpus: int, log: Path | None, env: dict[str, str],
                    resources: dict[str, float] | None, token: str | None, dashboard: str = "") -> Service:
    """A head node (`address` None: with a dashboard on 127.0.0.1) or a node joining `address`."""
    temp = tempfile.mkdtemp(prefix="hdm-ray-")
    log = log or Path(temp) / "ray-start.log"
    _, ports = _ray_ports(head=address is None)
    role = ["--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true"] if address is None else [
        f"--address={address}"]
    cmd = [str(BIN / "ray"), "start", *role, "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
           "--node-ip-address=127.0.0.1", "--disable-usage-stats", f"--temp-dir={temp}", *ports]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    out = open(log, "ab")
    proc = subprocess.Popen(cmd, env=_env(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    flag = dict(p[2:].split("=", 1) for p in ports)
    try:
        if address is None:
            url = f"http://127.0.0.1:{flag['dashboard-port']}"
            _wait_http(f"{url}/api/version", 90, proc, token)
            _wait_http(f"{url}/api/jobs/", 60, proc, token)
        else:
            _wait_node(dashboard, next(r for r in resources or {} if r.startswith("hdm_node_")), proc, env)
    except Exception as e:
        _stop_pid(proc.pid, "ray")
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        shutil.rmtree(temp, ignore_errors=True)
        raise RuntimeError(f"{e}\n{tail}") from None
    if address is not None:
        return Service("ray-node", proc.pid, {}, [temp])
    return Service("ray", proc.pid, {"RAY_ADDRESS": f"127.0.0.1:{flag['port']}", "HDM_RAY_DASHBOARD": url}, [temp])


def _wait_node(dashboard: str, marker: str, proc: subprocess.Popen, env: dict[str, str],
               timeout: float = 90) -> None:
    """Until the cluster of `dashboard` lists a node with the resource `marker` as alive (`ray list nodes`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray node exited with code {proc.returncode}")
        listed = subprocess.run([str(BIN / "ray"), "list", "nodes", "--address", dashboard, "--format", "json",
                                 "--filter", "state=ALIVE"], capture_output=True, text=True, env=_env(env), timeout=60)
        if listed.returncode == 0 and listed.stdout.lstrip().startswith("[") and any(
                marker in n.get("resources_total", {}) for n in json.loads(listed.stdout)):
            return
        time.sleep(1.0)
    raise TimeoutError(f"the node did not join {dashboard} within {timeout:.0f} s")


def start_moto(log: Path | None = None) -> Service:
    port = free_port()
    out = open(log or os.devnull, "ab")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=_env(),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    _wait_http(f"{endpoint}/moto-api/", 30, proc)
    return Service("s3", proc.pid, {"HDM_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})


def start_mlflow(log: Path | None = None, root: Path | None = None, port: int | None = None, *,
                 auth: tuple[str, str] | None = None) -> Service:
    """An MLflow server in light mode (no job execution), sqlite + local artifacts under `root`, kept
    after stop when `root` is given (the demo's runs survive `make down`), else a temporary folder. `port`:
    a given one (a server restarted where its clients expect it), else a free one. `auth`: (user, password)
    of MLflow's basic-auth app, its admin; its user store is `root`/basic_auth.db, and clients pass the pair
    as MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (given back in the service's env)."""
    keep = root is not None
    if keep:
        root.mkdir(parents=True, exist_ok=True)
        root = root.resolve()
    else:
        root = Path(tempfile.mkdtemp(prefix="hdm-mlflow-"))
    port = port or free_port()
    env = dict(_env(), MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    app: list[str] = []
    if auth:
        env.update(_mlflow_auth_env(root, *auth))
        app = ["--app-name", "basic-auth"]
    out = open(log or os.devnull, "ab")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                             "--default-artifact-root", f"{root}/artifacts", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", *app], env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    _wait_http(f"{uri}/health", 90, proc)  # /health answers without a login
    clients = {"MLFLOW_TRACKING_URI": uri}
    if auth:
        clients.update(MLFLOW_TRACKING_USERNAME=auth[0], MLFLOW_TRACKING_PASSWORD=auth[1])
    return Service("mlflow", proc.pid, clients, [] if keep else [str(root)])


def _mlflow_auth_env(root: Path, user: str, password: str) -> dict[str, str]:
    """The server-side environment of MLflow's basic-auth app: its config file (written under `root`: the
    user store's location, no credential), the admin it creates on first start, and the static key its
    CSRF protection needs (random: the store outlives it, the key need not)."""
    config = root / "basic_auth.ini"
    config.write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/basic_auth.db\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_USERNAME": user,
            "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex}


def _stop_pid(pid: int, name: str, timeout: float = 60) -> None:
    """SIGTERM the service's own process (Ray's `start --block` then drains its node: 3-35 s seen on a
    busy 2-core machine), then SIGKILL whatever is left of its process group."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:  # not our child (stopped from another process): poll for it
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
        time.sleep(0.2)
    try:  # whatever is left of the session it started: only this service's processes
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop(service: Service) -> None:
    _stop_pid(service.pid, service.name)
    for path in service.cleanup:
        shutil.rmtree(path, ignore_errors=True)


def kill(service: Service) -> None:
    """SIGKILL the service's whole process group at once, as a crash (or a pulled plug) would end it: `stop`
    lets `ray start --block` drain its node first, for up to tens of seconds while its work goes on."""
    try:
        os.killpg(service.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.waitpid(service.pid, 0)
    except ChildProcessError:
        pass
    for path in service.cleanup:
        shutil.rmtree(path, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or the PID now belongs to someone else
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--state", required=True, type=Path)
    ap.add_argument("--ray", action="store_true")
    ap.add_argument("--s3", action="store_true")
    ap.add_argument("--mlflow", action="store_true")
    ap.add_argument("--logs", type=Path, help="folder for the services' logs")
    ap.add_argument("--mlflow-root", type=Path,
                    help="keep MLflow's sqlite store and artifacts here (default: a temporary folder, removed on down)")
    args = ap.parse_args(argv)
    if args.action == "down":
        if args.state.exists():
            for data in json.loads(args.state.read_text()):
                stop(Service(**data))
            args.state.unlink()
        return 0
    running: list[Service] = []
    if args.state.exists():  # `up` again: keep what still runs, clear what died, start what is missing
        for service in (Service(**data) for data in json.loads(args.state.read_text())):
            if alive(service.pid):
                running.append(service)
            else:
                stop(service)  # its process group's leftovers and temporary folders
    # moto first: the Ray node gets its credentials in its own environment, as a real node does (jobs never
    # carry them in their runtime env)
    def node_env() -> dict[str, str]:
        return {k: v for s in started if s.name == "s3" for k, v in s.env.items() if k.startswith("AWS_")}

    starters = {"s3": (args.s3, start_moto), "mlflow": (args.mlflow, lambda log: start_mlflow(log, args.mlflow_root)),
                "ray": (args.ray, lambda log: start_ray_head(log=log, env=node_env()))}
    started = list(running)
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    try:
        for name, (wanted, start) in starters.items():
            if wanted and name not in {s.name for s in started}:
                started.append(start(log=args.logs / f"{name}.log" if args.logs else None))
                args.state.write_text(json.dumps([asdict(s) for s in started]))
    except Exception as e:
        for service in started[len(running):]:
            stop(service)
        args.state.write_text(json.dumps([asdict(s) for s in running]))
        print(f"could not start services: {e}", file=sys.stderr)
        return 1
    for service in started:
        for k, v in service.env.items():
            print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ray's fake multi-node autoscaler on one machine: a CPU-only head plus fake GPU worker nodes from zero.

Used by ``tests/test_cluster_sim.py`` and ``bench``-style experiments; the same recipe is written out
as shell in docs/operations.md ("Try the cluster on one machine").

What it does not do, on purpose: ``ray.cluster_utils.AutoscalingCluster.start()`` runs ``ray stop
--force`` (every Ray on the machine dies), so the head is started here with ``ray start --head --block``
and every process this cluster started is stopped by PID: the head's process group, and the fake
worker nodes' raylets (they are started by the head's autoscaler and outlive the head), found by the
session directory of this head.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: The node id the fake_multinode provider gives the head (workers count up from it).
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"


def host_ip() -> str:
    """This machine's outward IP (what ``ray start`` records as the head's node IP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))  # no packet is sent for a UDP connect
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def autoscaling_config(ip: str, port: int, head_cpus: int = 1, gpu_nodes: int = 2,
                       gpu_node_cpus: int = 1, idle_timeout_minutes: float = 0.1) -> dict[str, Any]:
    """The whole fake_multinode launcher config (the Ray wheel has no example.yaml to start from)."""
    return {
        "cluster_name": "fake_multinode",
        "max_workers": gpu_nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"{ip}:{port}"},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": gpu_node_cpus, "GPU": 1}, "node_config": {},
                           "min_workers": 0, "max_workers": gpu_nodes},
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, host: str = "127.0.0.1", timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


class SimCluster:
    """A fake autoscaling cluster started and stopped by PID (see the module docstring)."""

    def __init__(self, workdir: Path, gpu_nodes: int = 2, head_cpus: int = 1, gpu_node_cpus: int = 1,
                 idle_timeout_minutes: float = 0.1, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.workdir = Path(workdir)
        self.cwd = cwd  # the head's processes (and jobs submitted without a working dir) run here
        self.ip = host_ip()
        self.port, self.dash = _free_port(), _free_port()
        self.config = autoscaling_config(self.ip, self.port, head_cpus, gpu_nodes, gpu_node_cpus,
                                         idle_timeout_minutes)
        self.head_cpus = head_cpus
        self.bin = Path(sys.executable).parent
        self.env = dict(env if env is not None else os.environ,
                        RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="token",
                        PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}")
        self.env.pop("RAY_ADDRESS", None)
        self.head: subprocess.Popen | None = None  # unused: the head is not a --block child
        self.session_dir: str | None = None
        self.session_name: str | None = None
        self.worker_raylets: dict[int, str] = {}  # every worker raylet seen: PID → fake node id

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dash}"

    def start(self, attempts: int = 8) -> SimCluster:
        """Start the head with ``ray start --head`` (not ``--block``: a blocking head kills the whole node
        when one helper, e.g. the Ray Client server, misses a start-up timeout on a loaded machine).
        Everything of this cluster is later found by its session name and stopped by PID.  A head that
        misses Ray's fixed 30 s raylet start-up window is started again."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "autoscaling.yaml"
        for attempt in range(attempts):
            self.port, self.dash, self.agent = _free_port(), _free_port(), _free_port()
            self.config["provider"]["gcs_address"] = self.address
            cfg.write_text(json.dumps(self.config))  # JSON is YAML
            log = self.workdir / f"head-{attempt}.log"
            # Every port of the head chosen free: Ray's fixed defaults (dashboard agent 52365, client server
            # 10001, …) are taken when another Ray runs on this machine, and a head whose agent cannot bind
            # answers every job submission with "No available agent to submit job".
            ports = [f"--dashboard-agent-listen-port={self.agent}", f"--dashboard-agent-grpc-port={_free_port()}",
                     f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}",
                     f"--ray-client-server-port={_free_port()}", f"--node-manager-port={_free_port()}",
                     f"--object-manager-port={_free_port()}"]
            proc = subprocess.run(
                [str(self.bin / "ray"), "start", "--head", f"--port={self.port}",
                 f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--autoscaling-config={cfg}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dash}", *ports, "--disable-usage-stats"],
                env=self.env, cwd=self.cwd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, timeout=600)
            text = log.read_text(errors="replace")
            self.session_name = self._find_session()
            self.session_dir = f"/tmp/ray/{self.session_name}" if self.session_name else None
            if proc.returncode == 0 and "Ray runtime started" in text:
                _wait_port(self.dash, timeout=180)
                _wait_port(self.agent, timeout=180)  # the job agent: jobs are accepted from now on
                return self
            self.stop()  # whatever of this attempt is left, by PID
        raise RuntimeError(f"the simulated cluster's head did not start in {attempts} attempts "
                           f"(see {self.workdir}/head-*.log)")

    def _find_session(self) -> str | None:
        """The session name of this head: on the command line of its processes, next to its GCS address."""
        for p in _all_pids():
            cmd = " ".join(_cmdline(p))
            if self.address in cmd or f"--gcs_server_port={self.port}" in cmd:
                m = re.search(r"(session_\d{4}-\d\d-\d\d_[0-9_-]+)", cmd)
                if m:
                    return m.group(1)
        return None

    def pids(self) -> list[int]:
        """Every process of this cluster: its session name is on each one's command line."""
        if not self.session_name:
            return []
        me = os.getpid()
        return [p for p in _all_pids() if p != me and any(self.session_name in a for a in _cmdline(p))]

    def raylets(self) -> dict[int, str]:
        """PID → fake node id of the worker raylets of this cluster (not the head's)."""
        out: dict[int, str] = {}
        if not self.session_dir:
            return out
        for pid in _all_pids():
            cmd = _cmdline(pid)
            if not cmd or not cmd[0].endswith("raylet"):
                continue
            if f"--session_dir={self.session_dir}" not in cmd:
                continue
            node_id = next((a.split("=", 1)[1] for a in cmd if a.startswith("--node_id=")), "")
            if node_id and node_id != FAKE_HEAD_NODE_ID:
                out[pid] = node_id
        self.worker_raylets.update(out)
        return out

    def wait_for(self, predicate, timeout: float, what: str, poll: float = 1.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"{what}: not within {timeout}s")

    def stop(self) -> None:
        """Stop every process of this cluster by PID (SIGTERM, then SIGKILL): the head's and the fake
        worker nodes' (their raylets outlive the head).  Never ``ray stop``.  Repeated until a scan finds
        none: the head's autoscaler may launch a node between a scan and its own end."""
        for _ in range(6):
            self.raylets()
            pids = {p for p in set(self.pids()) | set(self.worker_raylets) if _running(p)}
            if not pids:
                return
            for p in pids:
                try:
                    os.kill(p, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and any(_running(p) for p in pids):
                time.sleep(0.5)
            for p in pids:
                if _running(p):
                    kill_tree(p)
            time.sleep(1)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _children(root: int) -> list[int]:
    """``root`` and all its descendants."""
    parents = {p: _ppid(p) for p in _all_pids()}
    out, frontier = [root], [root]
    while frontier:
        nxt = [p for p, pp in parents.items() if pp in frontier and p not in out]
        out.extend(nxt)
        frontier = nxt
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Kill ``pid`` and its descendants (children first collected, then all signalled)."""
    for p in reversed(_children(pid)):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass

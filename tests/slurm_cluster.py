"""A real two-node SLURM cluster on this one machine, for tests and for trying the sbatch scripts.

slurmctld and one `slurmd -N <node>` per fake node run on 127.0.0.1 with their own ports, authenticated by
a private munged; every file (slurm.conf, munge key and socket, spool, state, logs, pid files) lives in one
state directory, so nothing outside it is touched except /etc/hosts (the node names must resolve, because
torchrun's rendezvous endpoint is the first node's name) and, if SLURM is missing, the apt packages.
Several clusters can run side by side (each picks free ports). Daemons are stopped by the pids recorded at
start, never by name.

    python tests/slurm_cluster.py start [--state-dir DIR]    # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py status|stop [--state-dir DIR]

Standard library only, so it runs before the project is installed. Needs root (SlurmUser=root, munged as
user munge) and, to install SLURM, apt-get.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STATE_DIR = Path(os.environ.get("GPTFORGE_SLURM_DIR", "/tmp/gptforge-slurm"))
NODE_PREFIX = "gfnode"
HOSTS_FILE = Path("/etc/hosts")
APT_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here (not root, no apt, ...): the reason says which."""


def ensure_installed(timeout_s: float = 300) -> None:
    """Install slurm-wlm and munge with apt if their daemons are missing; raise SlurmUnavailable if we cannot."""
    if all(shutil.which(d) for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            "SLURM is not installed and installing it needs root (apt-get install slurm-wlm munge)"
        )
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(
            "SLURM is not installed and there is no apt-get to install slurm-wlm and munge"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=120"]  # another session may be installing at the same moment
    for cmd in (
        ["apt-get", *lock, "update"],
        ["apt-get", *lock, "install", "-y", "--no-install-recommends", *APT_PACKAGES],
    ):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(
                f"`{' '.join(cmd)}` did not finish in {timeout_s:.0f}s (no package mirror?)"
            ) from None
        if proc.returncode != 0:
            raise SlurmUnavailable(
                f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
            )
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        raise SlurmUnavailable(f"apt installed {APT_PACKAGES} but {missing} are still not on PATH")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (daemons and rendezvous of side-by-side clusters never clash)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(name: str, pid: int) -> bool:
    """Is `pid` still the daemon `name` we started? (Not a zombie, and not a reused pid of another program.)"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and Path(argv0).name == name.split("-")[0]


class SlurmCluster:
    """One local cluster rooted at `state_dir`: `start()`, `stop()`, `env()` for client commands."""

    def __init__(self, state_dir: Path | str = DEFAULT_STATE_DIR, nodes: int = 2, cpus_per_node: int = 1):
        self.state_dir = Path(state_dir).resolve()
        self.nodes = [f"{NODE_PREFIX}{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.conf = self.state_dir / "slurm.conf"
        self.munge_dir = self.state_dir / "munge"
        self.log_dir = self.state_dir / "log"
        self.pid_dir = self.state_dir / "pids"

    # -- client side -------------------------------------------------------------------------------
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for sbatch/srun/squeue/scontrol: SLURM_CONF points at this cluster's config."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def pids(self) -> dict[str, int]:
        """Daemons this cluster started, by name (`munged`, `slurmctld`, `slurmd-gfnode1`, ...)."""
        if not self.pid_dir.is_dir():
            return {}
        return {p.stem: int(p.read_text()) for p in sorted(self.pid_dir.glob("*.pid"))}

    def running(self) -> bool:
        pids = self.pids()
        return bool(pids) and all(_alive(name, pid) for name, pid in pids.items())

    # -- start / stop ------------------------------------------------------------------------------
    def start(self, timeout_s: float = 90) -> None:
        """Install if needed, write the config, start munged, slurmctld and the slurmd's; wait until idle."""
        if os.geteuid() != 0:
            raise SlurmUnavailable(
                "the local SLURM cluster runs its daemons as root (SlurmUser=root); run as root"
            )
        ensure_installed()
        if self.running():
            raise RuntimeError(f"a cluster is already running from {self.state_dir}; stop it first")
        self.stop()  # leftovers of a crashed run: stale pids are skipped
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        for d in (
            self.state_dir,
            self.log_dir,
            self.pid_dir,
            self.state_dir / "ctld",
            self.state_dir / "spool",
        ):
            d.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)  # munged runs as user munge and must reach its own directory
        self._ensure_hosts()
        self._start_munged()
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_idle(timeout_s)

    def stop(self, timeout_s: float = 15) -> None:
        """Cancel this cluster's jobs, then SIGTERM (later SIGKILL) the daemons recorded at start, by pid."""
        pids = {name: pid for name, pid in self.pids().items() if _alive(name, pid)}
        if not pids:
            return
        if "slurmctld" in pids and self.conf.exists():
            # Jobs run under slurmstepd processes that the slurmd's forked: end them through SLURM.
            self.run("scancel", "--full", f"--user={pwd.getpwuid(os.geteuid()).pw_name}", check=False)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        # slurmd's first, munged last: the others authenticate through it until they exit.
        order = sorted(pids, key=lambda n: (n == "munged", n == "slurmctld"))
        for name in order:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[name], signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _alive(name, pids[name]) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(name, pids[name]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[name], signal.SIGKILL)
        for pidfile in self.pid_dir.glob("*.pid"):
            pidfile.unlink()

    def status(self) -> str:
        lines = [f"state dir: {self.state_dir}", f"SLURM_CONF={self.conf}"]
        for name, pid in self.pids().items():
            lines.append(f"{name:<16} pid {pid:<8} {'running' if _alive(name, pid) else 'DEAD'}")
        if self.running():
            lines.append(self.run("sinfo", "-N", check=False).stdout.rstrip())
        elif not self.pids():
            lines.append("not running")
        return "\n".join(lines)

    # -- pieces --------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], **kwargs) -> int:
        """Start a daemon in the foreground mode (-D/-F), detached in its own session; record its pid."""
        log = open(self.log_dir / f"{name}.out", "ab")  # noqa: SIM115 - handed to the daemon, closed below
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kwargs,
            )
        finally:
            log.close()
        (self.pid_dir / f"{name}.pid").write_text(str(proc.pid))
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited at once (code {proc.returncode}); see {self.log_dir}/{name}.out"
            )
        return proc.pid

    def _ensure_hosts(self) -> None:
        names = set(self.nodes)
        try:
            text = HOSTS_FILE.read_text()
        except OSError as exc:
            raise SlurmUnavailable(f"cannot read {HOSTS_FILE}: {exc}") from None
        known = {
            n for line in text.splitlines() if line.split()[:1] == ["127.0.0.1"] for n in line.split()[1:]
        }
        missing = sorted(names - known)
        if missing:
            try:
                with HOSTS_FILE.open("a") as f:
                    f.write(
                        ("" if text.endswith("\n") else "\n")
                        + f"127.0.0.1 {' '.join(missing)}  # gptforge local SLURM\n"
                    )
            except OSError as exc:
                raise SlurmUnavailable(f"cannot add node names {missing} to {HOSTS_FILE}: {exc}") from None

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        self._spawn(
            "munged",
            [
                "munged", "--foreground", "--force", "--num-threads=4",
                f"--key-file={key}", f"--socket={self.munge_socket}",
                f"--pid-file={self.munge_dir / 'munged.pid'}", f"--log-file={self.munge_dir / 'munged.log'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
            ],
            user=munge.pw_uid, group=munge.pw_gid, extra_groups=[],
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not Path(self.munge_socket).exists():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"munged did not create {self.munge_socket}; see {self.munge_dir}/munged.log"
                )
            time.sleep(0.05)

    @property
    def munge_socket(self) -> str:
        return str(self.munge_dir / "munge.socket")

    def _write_conf(self) -> None:
        ports = [free_port() for _ in range(1 + len(self.nodes))]
        s = self.state_dir
        node_lines = [
            f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={node} Port={port} CPUs={self.cpus_per_node} "
            "RealMemory=1000 State=UNKNOWN"
            for node, port in zip(self.nodes, ports[1:], strict=True)
        ]
        self.conf.write_text(
            "\n".join(
                [
                    "# Written by tests/slurm_cluster.py: a local test cluster, every path under its state dir.",
                    "ClusterName=gptforge",
                    f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
                    f"SlurmctldPort={ports[0]}",
                    # Job ids from the port: two clusters side by side never hand out the same id, so
                    # torchrun rendezvous ids (--rdzv_id=$SLURM_JOB_ID) cannot collide either.
                    f"FirstJobId={ports[0] * 10}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire is also how long a requeued job waits before it may start again (120 s default).
                    f"AuthInfo=socket={self.munge_socket},cred_expire=5",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SlurmdParameters=config_overrides",
                    "SchedulerType=sched/builtin",
                    "SchedulerParameters=sched_interval=2",
                    "MpiDefault=none",
                    "JobRequeue=1",
                    "ReturnToService=2",
                    "KillWait=30",
                    "MinJobAge=600",
                    "InactiveLimit=0",
                    "AccountingStorageType=accounting_storage/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "JobCompType=jobcomp/none",
                    f"StateSaveLocation={s}/ctld",
                    f"SlurmdSpoolDir={s}/spool/%n",
                    f"SlurmctldPidFile={s}/log/slurmctld.pid",
                    f"SlurmdPidFile={s}/log/slurmd-%n.pid",
                    f"SlurmctldLogFile={s}/log/slurmctld.log",
                    f"SlurmdLogFile={s}/log/slurmd-%n.log",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    *node_lines,
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            dead = [name for name, pid in self.pids().items() if not _alive(name, pid)]
            if dead:
                raise RuntimeError(f"{dead} exited during start-up; see the logs in {self.log_dir}")
            states = self.node_states()
            if len(states) == len(self.nodes) and all(st == "idle" for st in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(
            f"nodes not idle after {timeout_s:.0f}s (sinfo: {states}); see the logs in {self.log_dir}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument(
        "--state-dir", default=str(DEFAULT_STATE_DIR), help="default: %(default)s ($GPTFORGE_SLURM_DIR)"
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    args = parser.parse_args(argv)
    cluster = SlurmCluster(args.state_dir, nodes=args.nodes, cpus_per_node=args.cpus_per_node)
    try:
        if args.action == "start":
            t0 = time.monotonic()
            cluster.start()
            print(
                f"# local SLURM up in {time.monotonic() - t0:.1f}s: nodes {','.join(cluster.nodes)}",
                file=sys.stderr,
            )
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.action == "stop":
            cluster.stop()
        else:
            print(cluster.status())
            return 0 if cluster.running() else 3
    except (SlurmUnavailable, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

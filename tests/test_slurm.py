"""A real one-node SLURM on localhost runs the recipes through the shared launcher.

- the tiny CPU recipe (recipes/tiny_cpu.sbatch) trains to COMPLETED with a falling loss and a
  profile, and resumes from its checkpoint after a requeue;
- USR1 before the time limit makes the launcher requeue the job (stand-in entry);
- a GPU recipe, shrunk to this node, takes the launcher's GPU path on stand-in GPU GRES.

The cluster lives entirely in a temp dir: its own munge key and socket, a generated slurm.conf on
free ports, slurmctld and slurmd in the foreground as our children. Nothing system-wide is touched
(no /etc/munge, no default ports), so it can run beside another SLURM or munge on the machine.
Daemons are stopped by the pids we started, also when the test fails.

Skips (with the reason) where slurm-wlm/munge are not installed (`.ci/install_slurm.sh` installs
them) or the daemons cannot start here (e.g. not root, no /proc).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import free_port

REPO = Path(__file__).resolve().parents[1]
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
FAKE_GPUS = 2


def _node_line(gpus: int) -> str:
    """The node's real hardware as slurmd sees it (a mismatch would leave the node drained), plus
    `gpus` stand-in GPUs."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next(l for l in out.splitlines() if l.startswith("NodeName="))
    # The node must answer on loopback whatever the host's DNS says.
    return line + (f" Gres=gpu:{gpus}" if gpus else "") + " NodeAddr=127.0.0.1 State=UNKNOWN"


class LocalSlurm:
    """munged + slurmctld + slurmd on localhost, configured and kept under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.host = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- bring-up -------------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = r / "munge" / "munge.socket"
        # --force: the temp dir's parents (/tmp) are world-writable, which munged otherwise refuses.
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                f"--key-file={key}", f"--pid-file={r / 'munge' / 'munged.pid'}",
                                f"--seed-file={r / 'munge' / 'seed'}", f"--log-file={r / 'log' / 'munged.log'}"])
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self.fake_gpus = self._make_fake_gpus()
        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait_for(self._node_idle, timeout, "node idle in sinfo")

    def _make_fake_gpus(self) -> int:
        """Stand-in GPUs, so jobs can ask for --gpus-per-node and the launcher's GPU path (one task
        per GPU, NCCL/NVSHMEM environment) runs here: slurmd wants a character device per GPU in
        gres.conf, so each is a node with /dev/null's numbers in the temp dir. No GPU is touched.
        Returns 0 (no GPU GRES) where mknod is not allowed."""
        devices = [self.root / f"fakegpu{i}" for i in range(FAKE_GPUS)]
        try:
            for d in devices:
                os.mknod(d, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError:
            return 0
        (self.root / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={self.root}/fakegpu[0-{FAKE_GPUS - 1}]\n")
        return FAKE_GPUS

    def _slurm_conf(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=localtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # A requeued job waits cred_expire + 1 s before it may start again (slurmd refuses the
            # job's old, revoked credential until then): 120 s by default, too long for a test.
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'ctld.pid'}", f"SlurmdPidFile={r / 'd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'ctld.log'}", f"SlurmdLogFile={r / 'log' / 'd.log'}",
            # No cgroups in containers: track processes through /proc, bind nothing.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", "MpiDefault=none",
            # Free ports, so a SLURM already on this machine (or a parallel test) is not disturbed.
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "SchedulerParameters=sched_interval=1", "MinJobAge=600",
            *(["GresTypes=gpu"] if self.fake_gpus else []),
            _node_line(self.fake_gpus),
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             start_new_session=True)
        self.procs.append((name, p))

    def _node_idle(self) -> bool:
        for name, p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {self.root / 'log'}")
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             env=self.env, timeout=10).stdout
        return out.strip().startswith("idle")

    @staticmethod
    def _wait_for(cond, timeout: float, what) -> None:
        """Poll ``cond`` until true; on timeout raise with ``what`` (a string, or a callable giving
        one, evaluated then: e.g. the job's state at that moment)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if cond():
                return
            time.sleep(0.2)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")

    # -- use ------------------------------------------------------------------------------------
    def sbatch(self, argv: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        """Submit; `env` adds to the job's environment (sbatch exports the caller's). The tests pass
        a free MASTER_PORT: the launcher's default comes from the job id, and job ids restart at 1
        in every test cluster, so two sessions on one machine would otherwise pick the same port."""
        out = subprocess.run(["sbatch", "--parsable", *argv], capture_output=True, text=True,
                             env={**self.env, **(env or {})}, cwd=cwd, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True,
                             text=True, env=self.env, timeout=10).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float) -> dict[str, str]:
        done = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
        self._wait_for(lambda: self.job(job_id).get("JobState") in done, timeout,
                       lambda: f"job {job_id} to be done: {self.job(job_id)}")
        return self.job(job_id)

    def wait_restart(self, job_id: int, restarts: int, timeout: float) -> dict[str, str]:
        """Wait until the job has been restarted `restarts` times and is done again."""
        def restarted_and_done() -> bool:
            info = self.job(job_id)
            return int(info.get("Restarts", 0)) >= restarts and info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED")

        self._wait_for(restarted_and_done, timeout,
                       lambda: f"job {job_id} to be restarted {restarts}x and done: {self.job(job_id)}")
        return self.job(job_id)

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # -- tear-down: only the pids we started, children first ----------------------------------
    def stop(self) -> None:
        # Jobs first: their slurmstepd/task processes outlive slurmd, so cancel them through our
        # own controller (SLURM_CONF) and give them a few seconds to go.
        if any(name == "slurmctld" and p.poll() is None for name, p in self.procs):
            subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], env=self.env,
                           capture_output=True, timeout=10)
            t0 = time.monotonic()
            while time.monotonic() - t0 < 15:
                out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%T"], env=self.env,
                                     capture_output=True, text=True, timeout=10).stdout.split()
                if not any(state in ("RUNNING", "COMPLETING", "CONFIGURING") for state in out):
                    break
                time.sleep(0.3)
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs.clear()


@pytest.fixture(scope="module")
def local_slurm():
    """One cluster for this file's tests (bring-up is a few seconds; jobs are independent)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"slurm-wlm/munge not installed (missing {', '.join(missing)}); "
                    "run .ci/install_slurm.sh")
    if os.geteuid() != 0:
        pytest.skip("a private slurmd must run as root (SlurmdUser=root)")
    # Short path: unix socket paths are limited to ~108 bytes and pytest's tmp paths can be long.
    root = Path(subprocess.run(["mktemp", "-d", "/tmp/slurm-XXXXXX"], capture_output=True,
                               text=True, check=True).stdout.strip())
    cluster = LocalSlurm(root)
    try:
        try:
            cluster.start()
        except Exception as e:  # noqa: BLE001 - any bring-up failure means "cannot run here"
            pytest.skip(f"local SLURM could not start here: {e}\n{cluster.logs()}")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_trivial_job(local_slurm, tmp_path):
    """The harness itself: a two-task job runs to COMPLETED."""
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\n#SBATCH --ntasks=2\nsrun hostname\necho done\n")
    jid = local_slurm.sbatch(["-o", str(tmp_path / "out-%j.txt"), str(script)])
    info = local_slurm.wait(jid, timeout=60)
    text = (tmp_path / f"out-{jid}.txt").read_text()
    assert info["JobState"] == "COMPLETED", (info, text, local_slurm.logs())
    assert text.strip().endswith("done")


LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*\| lm loss: ([0-9.E+-]+) \|")


def test_tiny_cpu_recipe_trains_and_resumes_after_requeue(local_slurm, tmp_path):
    """sbatch recipes/tiny_cpu.sbatch: 2 ranks through srun, COMPLETED, loss falling, a profile of
    steps 10-12 (PROFILE=torch) that trace_summary reads; then a requeue (same job id, same run
    dir) resumes from the latest checkpoint."""
    env = {"DEEPEP_RUN_ROOT": str(tmp_path / "runs"), "MASTER_PORT": str(free_port()), "PROFILE": "torch"}
    jid = local_slurm.sbatch(["-o", str(tmp_path / "slurm-%j.out"), str(REPO / "recipes" / "tiny_cpu.sbatch")],
                             env=env, cwd=tmp_path)
    info = local_slurm.wait(jid, timeout=240)
    run_dir = tmp_path / "runs" / f"deepep-tiny-cpu-{jid}"
    log = (run_dir / "logs" / "train.restart0.log").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log[-5000:], local_slurm.logs())
    losses = [float(m.group(2)) for m in LOSS.finditer(log)]
    assert len(losses) == 30, log[-3000:]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses  # falling, clearly
    assert "world 2, TP 1, EP 2, DP 2, dispatcher deepep" in log
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert (tmp_path / f"slurm-{jid}.out").read_text().count("lm loss") == 30  # sbatch's own output too
    summary = subprocess.run([sys.executable, str(REPO / "scripts" / "trace_summary.py"), str(run_dir / "profile")],
                             capture_output=True, text=True, timeout=60)
    assert summary.returncode == 0 and "2 trace file(s)" in summary.stdout, summary.stderr
    assert re.search(r"^deepep/dispatch +\d+", summary.stdout, re.M), summary.stdout

    subprocess.run(["scontrol", "requeue", str(jid)], env=local_slurm.env, check=True, timeout=10)
    info = local_slurm.wait_restart(jid, restarts=1, timeout=180)
    log1 = (run_dir / "logs" / "train.restart1.log").read_text()
    assert info["JobState"] == "COMPLETED", (info, log1[-5000:], local_slurm.logs())
    assert "resuming from" in log1 and "starting at iteration 30" in log1, log1[-3000:]


# A stand-in training entry for the launcher's own tests: a real gloo rendezvous and all_reduce over
# the env:// variables the launcher sets, and the checkpoint marker the launcher looks for.
_ENTRY = r"""
import os, sys, time
import torch, torch.distributed as dist
argv = sys.argv[1:]
save = argv[argv.index("--save") + 1]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"rank {rank}/{world} local {os.environ['LOCAL_RANK']} sum {t.item():.0f} "
      f"load={'--load' in argv} extra={argv[-1]}", flush=True)
if rank == 0:
    open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w").write("1")
sleep = float(os.environ.get("ENTRY_SLEEP", "0"))
if sleep and "--load" not in argv:
    time.sleep(sleep)
dist.barrier()
dist.destroy_process_group()
"""


def _launcher_env(tmp_path: Path, source: str = _ENTRY, name: str = "entry.py") -> dict:
    """Environment for recipes/launch.sh that runs the stand-in entry ``source`` instead of the trainer."""
    entry = tmp_path / name
    entry.write_text(source)
    return {"ENTRY": f"{sys.executable} {entry}", "DEEPEP_RUN_ROOT": str(tmp_path / "runs"),
            "MASTER_PORT": str(free_port())}


def test_launcher_requeues_itself_on_usr1(local_slurm, tmp_path):
    """`#SBATCH --signal=B:USR1@T` warns the batch shell before the time limit: the launcher
    requeues the job, which restarts and resumes from the checkpoint."""
    env = {**_launcher_env(tmp_path), "ENTRY_SLEEP": "60"}
    jid = local_slurm.sbatch(["-o", str(tmp_path / "o-%j.txt"), str(REPO / "recipes" / "tiny_cpu.sbatch")],
                             env=env, cwd=tmp_path)
    run_dir = tmp_path / "runs" / f"deepep-tiny-cpu-{jid}"
    ckpt = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    log0_path = run_dir / "logs" / "train.restart0.log"
    rank_lines = ("0: rank 0/2 local 0 sum 3", "1: rank 1/2 local 1 sum 3")

    def first_run_is_up() -> bool:
        # Both ranks' lines, not only rank 0's checkpoint: srun forwards each rank's output on its own
        # schedule, and a line still in flight when USR1 ends the step never reaches the log.
        log = log0_path.read_text() if log0_path.exists() else ""
        return ckpt.exists() and all(line in log for line in rank_lines)

    local_slurm._wait_for(first_run_is_up, 60, "the first run's checkpoint and both ranks' lines")
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(jid)], env=local_slurm.env, check=True, timeout=10)
    info = local_slurm.wait_restart(jid, restarts=1, timeout=120)
    assert info["JobState"] == "COMPLETED", (info, local_slurm.logs())
    log0 = log0_path.read_text()
    assert "time limit near: requeueing" in log0, log0
    assert "load=True" in (run_dir / "logs" / "train.restart1.log").read_text()


_ENV_ENTRY = r"""
import os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
keys = ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
        "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_IB_TIMEOUT", "SLURM_CPUS_PER_TASK")
print(f"rank {dist.get_rank()}/{dist.get_world_size()} " + " ".join(f"{k}={os.environ.get(k)}" for k in keys)
      + f" args={' '.join(sys.argv[1:4])} fp8={'--fp8-format' in sys.argv}", flush=True)
dist.destroy_process_group()
"""


def test_gpu_recipe_path_with_stand_in_entry(local_slurm, tmp_path):
    """A GPU recipe (qwen3_moe, fp8) shrunk on the sbatch command line to this node's 2 CPUs and
    2 GRES "gpus": the launcher's GPU path checks one task per GPU and exports the NCCL/NVSHMEM
    settings; a stand-in entry reports what each rank got. A task/GPU mismatch is refused."""
    if not local_slurm.fake_gpus:
        pytest.skip("no stand-in GPUs here (mknod not allowed)")
    env = _launcher_env(tmp_path, _ENV_ENTRY, "env_entry.py")
    small = ["--nodes=1", "--ntasks-per-node=2", f"--gpus-per-node={FAKE_GPUS}", "--cpus-per-task=1", "--no-requeue"]
    jid = local_slurm.sbatch(["-o", str(tmp_path / "o-%j.txt"), *small, str(REPO / "recipes" / "qwen3_moe.sbatch"), "fp8"],
                             env=env, cwd=tmp_path)
    info = local_slurm.wait(jid, timeout=60)
    text = (tmp_path / f"o-{jid}.txt").read_text()
    assert info["JobState"] == "COMPLETED", (info, text, local_slurm.logs())
    for rank in (0, 1):
        assert (f"{rank}: rank {rank}/2 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 "
                f"CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_IB_TIMEOUT=22 SLURM_CPUS_PER_TASK=1 "
                f"args=--num-layers 48 --hidden-size fp8=True") in text, text

    # One task on a node whose 2 GPUs the (exclusive) job holds: refused before anything starts.
    bad = local_slurm.sbatch(["-o", str(tmp_path / "bad-%j.txt"), "--nodes=1", "--ntasks-per-node=1",
                              f"--gpus-per-node={FAKE_GPUS}", "--cpus-per-task=1", "--no-requeue",
                              str(REPO / "recipes" / "qwen3_moe.sbatch")], env=env, cwd=tmp_path)
    info = local_slurm.wait(bad, timeout=60)
    text = (tmp_path / f"bad-{bad}.txt").read_text()
    assert info["JobState"] == "FAILED", (info, text)
    assert f"one task per GPU: --ntasks-per-node=1 but {FAKE_GPUS} GPUs per node" in text, text

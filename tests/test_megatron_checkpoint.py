"""dist-checkpointing save -> load -> continue gives the losses of an uninterrupted run
(deepep dispatcher, distributed optimizer, bf16: the path with the most state)."""
import pytest

pytest.importorskip("megatron.core")

import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from test_megatron_equivalence import TINY  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ .*\| lm loss: (\S+) \|")


def run_in_own_session(command: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``command`` as the leader of a new session; whatever it started (torchrun's workers) is
    killed with it when it times out, and anything left behind after it exits is killed too."""
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(command)} did not finish within {timeout_s:.0f} s; killed with every "
                             f"process it started:\n{out[-3000:]}\n{err[-3000:]}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a worker that outlived its launcher
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def torchrun_pretrain(nproc: int, argv: list[str], timeout_s: float = 180) -> dict[int, str]:
    """Run ``torchrun -m deepep_megatron.pretrain`` (a real launch: dist checkpointing starts
    helper processes, which the daemonic harness ranks may not); return {iteration: printed loss}."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "deepep_megatron.pretrain", *argv]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    done = run_in_own_session(command, env, timeout_s)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return {int(m.group(1)): m.group(2) for m in _LOSS.finditer(done.stdout)}


FLAGS = TINY + ["--expert-model-parallel-size", "2", "--num-experts", "4", "--moe-token-dispatcher", "deepep",
                "--use-distributed-optimizer", "--bf16"]


def test_resume_equals_uninterrupted(tmp_path):
    # megatron's dist checkpointing needs psutil (the [megatron] extra): without it the ranks hang
    # in the save until the timeout, so refuse up front.
    try:
        import psutil  # noqa: F401
    except ImportError as error:
        pytest.fail(f"psutil is not importable ({error}); megatron's checkpointing needs it: pip install psutil")
    ckpt = str(tmp_path / "ckpt")
    straight = torchrun_pretrain(2, FLAGS + ["--train-iters", "4"])
    first = torchrun_pretrain(2, FLAGS + ["--train-iters", "2", "--save", ckpt])
    second = torchrun_pretrain(2, FLAGS + ["--train-iters", "4", "--load", ckpt])
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4], (first, second)
    assert {**first, **second} == straight


def test_a_timed_out_launch_leaves_no_process_behind():
    """A launcher that starts a worker and hangs: the timeout kills both (no leaked ranks)."""
    script = ("import subprocess, sys, time\n"
              "worker = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
              "print(worker.pid, flush=True)\n"
              "time.sleep(120)\n")
    started = time.monotonic()
    with pytest.raises(AssertionError, match="did not finish within 3 s") as timed_out:
        run_in_own_session([sys.executable, "-c", script], dict(os.environ), timeout_s=3)
    assert time.monotonic() - started < 30
    worker = int(re.search(r"^(\d+)$", str(timed_out.value), re.M).group(1))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{worker}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # dead, waiting for init to reap it
                    return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.1)
    raise AssertionError(f"worker {worker} outlived the timed-out launcher")

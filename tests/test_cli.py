"""The command lines a user meets first: ``--help`` of every entry point, one short error per bad
flag (from one rank, before megatron-core is imported), the missing-megatron message, the quiet
output of the main job with its closing summary, and the dry run's resolved arguments."""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepep_megatron.megatron import cli
from deepep_megatron.megatron.arguments import LAUNCH_ENV

REPO = Path(__file__).resolve().parents[1]
HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None
needs_megatron = pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core not installed (pip install -e '.[megatron]')")
#: Python that cannot import megatron-core: whatever runs after this prelude proves it needs none.
NO_MEGATRON = "import sys; sys.modules['megatron'] = None\n"
#: The README's main job, shortened.
MAIN_JOB = ["--mock-data", "--expert-model-parallel-size", "2", "--num-experts", "4", "--moe-router-topk", "2",
            "--moe-token-dispatcher", "deepep", "--use-distributed-optimizer", "--lr", "3e-3"]


def _env(**extra: str) -> dict[str, str]:
    """This environment without a launcher's variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1", **extra)
    return env


def _run(command: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=_env(**env), timeout=timeout)


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", code, *args], **env)


# ------------------------------------------------------------------------------------ --help
HELP_COMMANDS = {
    "python -m deepep_megatron.pretrain --help": [sys.executable, "-m", "deepep_megatron.pretrain", "--help"],
    "python -m deepep_megatron.pretrain -h": [sys.executable, "-m", "deepep_megatron.pretrain", "-h"],
    "python -m deepep_megatron.megatron.dry_run --help": [sys.executable, "-m", "deepep_megatron.megatron.dry_run", "--help"],
}
EXPECTED_FLAGS = ["--moe-token-dispatcher", "--moe-deepep-fp8-dispatch", "--moe-deepep-backend", "--moe-deepep-num-sms",
                  "--moe-flex-dispatcher-num-sms", "--expert-model-parallel-size", "--show-warnings", "--dry-run"]


@pytest.mark.parametrize("name", sorted(HELP_COMMANDS))
def test_help_exits_0_and_lists_the_flags(name):
    out = _run(HELP_COMMANDS[name])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: "), out.stdout[:300]
    for flag in EXPECTED_FLAGS + (["--world-size", "--gpu-memory-gib"] if "dry_run" in name else []):
        assert flag in out.stdout, f"{flag} missing from `{name}`"
    assert "(default: 20)" in out.stdout  # defaults are rendered (the help string with '%' crashed this)
    assert out.stderr == ""


def test_console_script_help():
    script = shutil.which("deepep-megatron-pretrain")
    if script is None:
        pytest.skip("deepep-megatron-pretrain is not on PATH (pip install -e . installs it)")
    out = _run([script, "--help"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert all(flag in out.stdout for flag in EXPECTED_FLAGS)


def test_megatron_lm_runner_help():
    out = _run([sys.executable, "-m", "deepep_megatron.megatron.megatron_lm", "--help"])
    assert out.returncode == 0, out.stderr
    assert "SCRIPT" in out.stdout and "--moe-deepep-megatron" in out.stdout
    missing = _run([sys.executable, "-m", "deepep_megatron.megatron.megatron_lm", "--num-layers", "2"])
    assert missing.returncode == 2 and "first argument is Megatron-LM's script" in missing.stderr


def test_megatron_lm_provider_help_renders():
    """Megatron-LM's parser with our provider: the help (with %-expanded defaults) renders."""
    import argparse

    from deepep_megatron.megatron import megatron_lm

    parser = megatron_lm.extra_args_provider(argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    text = parser.format_help()
    assert "--moe-deepep-megatron" in text and "one scale per 128 channels" in text
    assert megatron_lm.extra_args_provider(parser) is parser  # a second call adds nothing (no argparse conflict)


def test_help_and_flag_errors_need_no_megatron_core():
    """Parsing comes before the megatron-core import: both work where megatron-core cannot load."""
    code = NO_MEGATRON + "from deepep_megatron.megatron.cli import main; main(sys.argv[1:])"
    assert _python(code, "--help").returncode == 0
    bad = _python(code, "--mock-data", "--num-experts", "0")
    assert bad.returncode == 2 and "--num-experts must be a positive integer, got 0" in bad.stderr


# ------------------------------------------------------------------------------------ short errors
def _launch_env(monkeypatch, **env: str) -> None:
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


TWO_RANKS = dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
FLAG_CASES = {
    # name: (environment, flags, what the one line must say)
    "typo": (TWO_RANKS, ["--moe-router-topkk", "2"],
             "unrecognized flag --moe-router-topkk (did you mean --moe-router-topk?)"),
    "bad choice": (TWO_RANKS, ["--moe-token-dispatcher", "flex"], "--moe-token-dispatcher: invalid choice: 'flex'"),
    "world vs EP": (dict(TWO_RANKS, WORLD_SIZE="3"), ["--expert-model-parallel-size", "2", "--num-experts", "4"],
                    "world size 3 is not divisible by --expert-model-parallel-size"),
    "global batch": (TWO_RANKS, ["--expert-model-parallel-size", "2", "--global-batch-size", "6", "--micro-batch-size", "4"],
                     "--global-batch-size (6) must be a multiple of --micro-batch-size x data-parallel size = 4 x 2"),
    "EP1 bias": (dict(TWO_RANKS, WORLD_SIZE="1"), [], "pass --disable-bias-linear"),
    "FP8 hidden": (TWO_RANKS, ["--expert-model-parallel-size", "2", "--hidden-size", "96", "--moe-deepep-fp8-dispatch"],
                   "needs --hidden-size divisible by 128"),
    "SM count": (TWO_RANKS, ["--moe-flex-dispatcher-num-sms", "7"],
                 "--moe-deepep-num-sms/--moe-flex-dispatcher-num-sms must be a positive even number (two SMs per channel), got 7"),
    "no checkpoint": (TWO_RANKS, ["--expert-model-parallel-size", "2", "--load", "/nonexistent/ckpt"],
                      "--load /nonexistent/ckpt: no latest_checkpointed_iteration.txt there; point --load at a --save directory"),
    "no torchrun": ({}, ["--expert-model-parallel-size", "2"], "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"),
    "dry run without world": ({}, ["--dry-run"], "--dry-run checks the flags for a world size and WORLD_SIZE is not set"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_flag_is_one_short_line(case, monkeypatch, capsys):
    env, flags, message = FLAG_CASES[case]
    _launch_env(monkeypatch, **env)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--mock-data", *flags])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and captured.out == "", captured.err  # no usage block
    assert lines[0].startswith("python -m deepep_megatron.pretrain: error: ") and message in lines[0], lines[0]
    if case == "no torchrun":
        assert "torchrun" in lines[0].split("not set", 1)[1]  # says how to start it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_backend_without_gpu_is_refused_before_anything(monkeypatch, capsys):
    _launch_env(monkeypatch, **TWO_RANKS)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--mock-data", "--expert-model-parallel-size", "2", "--moe-deepep-backend", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--moe-deepep-backend cuda needs a CUDA GPU" in err
    assert "--moe-deepep-backend auto or reference" in err


def test_only_rank_0_prints_the_error(monkeypatch, capsys):
    _launch_env(monkeypatch, **dict(TWO_RANKS, RANK="1"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--mock-data", "--moe-router-topkk", "2"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


def test_flag_errors_come_before_the_launch_check(monkeypatch, capsys):
    _launch_env(monkeypatch)  # no torchrun either: the typo is what the user needs to hear first
    with pytest.raises(SystemExit):
        cli.main(["--mock-data", "--num-layers", "-1"])
    assert "--num-layers must be a positive integer" in capsys.readouterr().err


def test_missing_megatron_says_how_to_install():
    code = NO_MEGATRON + "from deepep_megatron.megatron.cli import main; main(sys.argv[1:])"
    out = _python(code, *MAIN_JOB, **TWO_RANKS)
    assert out.returncode == 1, out.stderr[-2000:]
    assert len(out.stderr.splitlines()) == 1, out.stderr
    assert "needs megatron-core, which is not installed" in out.stderr and "pip install 'deepep_megatron[megatron]'" in out.stderr


# ------------------------------------------------------------------------------------ output
def test_known_noise_is_quiet_and_the_rest_is_not():
    code = r"""
import logging, warnings
from deepep_megatron.megatron.startup import quiet_known_noise
quiet_known_noise(); quiet_known_noise()  # twice: still one handler
warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
warnings.warn("a real problem", UserWarning)
log = logging.getLogger("megatron.core.datasets.gpt_dataset")
log.warning("Unable to save MockGPTDataset indexes because path_to_cache is None")
log.warning("a real megatron warning")
logging.getLogger("megatron.core.rerun_state_machine").warning("RerunStateMachine initialized in mode RerunMode.DISABLED")
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "a real problem" in out.stderr and out.stderr.count("a real megatron warning") == 1
    for noise in ("Apex", "all_gather_into_tensor", "path_to_cache", "RerunStateMachine"):
        assert noise not in out.stderr, out.stderr


_LOG_LINE = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| ETA: (\d+:\d\d:\d\d) \|.*\| lm loss: (\S+) \|")
_SUMMARY = re.compile(r"^done: (\d+) iterations in ([\d.]+) s \(([\d.]+) s setup and checkpoints\), (\d+) tokens/s, "
                      r"final loss ([\d.]+)$", re.M)


def _torchrun(*flags: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "deepep_megatron.pretrain", *MAIN_JOB, *flags], timeout=240)


@needs_megatron
def test_main_job_prints_one_banner_progress_with_eta_and_a_summary():
    out = _torchrun("--train-iters", "4", "--log-interval", "2")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "Warning" not in out.stdout + out.stderr, out.stderr  # no UserWarning / FutureWarning flood
    assert len(out.stderr.splitlines()) <= 2, out.stderr  # at most torchrun's OMP note
    assert out.stdout.count("deepep_megatron.pretrain: world 2") == 1  # rank 0 only
    logged = _LOG_LINE.findall(out.stdout)
    assert [int(i) for i, *_ in logged] == [2, 4], out.stdout
    assert logged[-1][2] == "0:00:00"  # nothing left after the last iteration
    summary = _SUMMARY.search(out.stdout)
    assert summary, out.stdout
    assert int(summary.group(1)) == 4 and int(summary.group(4)) > 0
    assert float(summary.group(3)) < float(summary.group(2))
    assert float(summary.group(5)) == pytest.approx(float(logged[-1][3]), abs=5e-5)  # the last iteration's loss
    assert "lm loss" not in out.stdout.splitlines()[-1]  # log scrapers count "lm loss" lines per iteration


@needs_megatron
def test_show_warnings_keeps_them():
    out = _torchrun("--train-iters", "1", "--show-warnings")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "UserWarning" in out.stderr and "Unable to save MockGPTDataset indexes" in out.stderr


# ------------------------------------------------------------------------------------ dry run
_DRY_RUNS = r"""
import contextlib, io, json, os, sys
from deepep_megatron.megatron import cli, dry_run
base = ["--mock-data", "--expert-model-parallel-size", "2", "--hidden-size", "128", "--num-attention-heads", "4",
        "--transformer-impl", "transformer_engine", "--fp8-format", "hybrid", "--fp8-recipe"]
results = {}
for recipe in ("blockwise", "delayed"):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = dry_run.main(["--world-size", "2", *base, recipe])
    results[recipe] = [status, out.getvalue()]
os.environ["WORLD_SIZE"] = "2"
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        cli.main([*base, "blockwise", "--dry-run"])
    except SystemExit as exit:
        results["entry"] = [exit.code, out.getvalue()]
print("@@" + json.dumps(results))
"""


@needs_megatron
def test_dry_run_prints_resolved_arguments():
    out = _python(_DRY_RUNS)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    results = json.loads(out.stdout.split("@@", 1)[1])
    for name, (status, text) in results.items():
        assert status == 0 and "dry run OK" in text, (name, text[-2000:])
        assert "  dry_run = True" in text, name
        assert "layout: world 2 = TP 1 x DP 2; experts: EP 2" in text, name
    assert "  moe_deepep_fp8_dispatch = True" in results["blockwise"][1]  # the recipe turns FP8 dispatch on
    assert "  moe_deepep_fp8_dispatch = True" in results["entry"][1]
    assert "  moe_deepep_fp8_dispatch = False" in results["delayed"][1]
    assert "world_size" not in results["blockwise"][1]  # the dry run's own flags are not pretraining arguments
    assert "Warning" not in out.stderr, out.stderr


def test_dry_run_needs_a_world_size():
    out = _run([sys.executable, "-m", "deepep_megatron.megatron.dry_run", "--mock-data"])
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert "--world-size N is required (or WORLD_SIZE=N)" in out.stderr


# ------------------------------------------------------------------------------------ structure
def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included), relative ones
    resolved within its package."""
    package = "deepep_megatron.megatron"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = {0: "", 1: package, 2: "deepep_megatron"}[node.level]
            module = ".".join(p for p in (base, node.module) if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_dry_run_and_training_do_not_import_each_other():
    folder = REPO / "deepep_megatron" / "megatron"
    assert "deepep_megatron.megatron.pretrain" not in _imported_modules(folder / "dry_run.py")
    assert "deepep_megatron.megatron.dry_run" not in _imported_modules(folder / "pretrain.py")
    # Both build the model from the one shared module.
    assert "deepep_megatron.megatron.model" in _imported_modules(folder / "dry_run.py") & _imported_modules(folder / "pretrain.py")

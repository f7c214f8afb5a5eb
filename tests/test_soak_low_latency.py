"""CPU smoke test of scripts/soak_low_latency.py: its oracle (every rank regenerates every rank's
inputs and computes what its experts receive and what its tokens combine to, without communication)
agrees with the reference backend on gloo over every feature the soak draws, and a planted error in
each checked output is reported with a replay command that reproduces it."""
from __future__ import annotations

import re
import subprocess

import pytest

from soak_harness import run_soak_script

#: Small shapes, so a few dozen rounds take seconds on two cores.
SMALL = ["--backend", "reference", "--max-tokens", "16", "--max-hidden", "512"]
#: Report rows that a 40-round draw must hit (the soak's claims).
DRAWN_FEATURES = ("fp8", "bf16", "fp8 round_scale", "fp8 ue8m0", "receive hook", "two micro-batches in flight",
                  "combine plain", "combine out", "combine zero_copy", "combine hook", "cumulative recv stats",
                  "a rank receives nothing")


def _soak(*args: str) -> subprocess.CompletedProcess:
    return run_soak_script("soak_low_latency.py", *args, timeout=180)


@pytest.mark.parametrize("ranks, rounds", [(2, 40), (3, 20)])
def test_low_latency_soak_reference_matches_oracle(ranks: int, rounds: int, tmp_path) -> None:
    out = tmp_path / "soak.md"
    run = _soak("--ranks", str(ranks), "--rounds", str(rounds), "--seed", "5", "--out", str(out), *SMALL)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"- EP{ranks}: {rounds} of {rounds} rounds in" in run.stdout and ", 0 failed" in run.stdout, run.stdout
    report = out.read_text()
    assert f"| all rounds | {rounds} | 0 |" in report, report
    # the reference backend combines in the oracle's order: bit for bit
    assert "| combine not bit-exact (within bf16 rounding) | 0 | 0 |" in report, report
    if ranks == 2:
        for feature in DRAWN_FEATURES:
            match = re.search(rf"^\| {re.escape(feature)} \| (\d+) \| 0 \|$", report, re.M)
            assert match and int(match.group(1)) > 0, f"no round with {feature}:\n{report}"
    assert run.stdout.rstrip().endswith(report.rstrip()), "the table must be printed last"


@pytest.mark.parametrize("output, message", [("recv_x", "recv_x: 1 of"), ("recv_count", "recv_count: 1 of"),
                                             ("recv_src_info", "recv_src_info: 1 of"),
                                             ("combined_x", "elements are beyond one bf16 rounding")])
def test_low_latency_soak_catches_planted_error_and_replays_it(output: str, message: str) -> None:
    run = _soak("--ranks", "2", "--rounds", "20", "--seed", "5", "--plant-error", output, "--stop-on-failure", *SMALL)
    assert run.returncode == 1, run.stdout + run.stderr
    assert message in run.stdout, run.stdout
    assert re.search(r"- EP2: \d+ of 20 rounds in .*, 1 failed, stopped early by a failure", run.stdout), run.stdout
    replay = re.search(r"replay: python (\S+) (.*)", run.stdout)
    assert replay, run.stdout
    again = _soak(*replay.group(2).split())
    assert again.returncode == 1 and message in again.stdout, again.stdout + again.stderr

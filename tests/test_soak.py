"""CPU smoke test of scripts/soak_intranode.py: the soak runs its GPU-style oracle (every rank
regenerates every rank's inputs and computes its expected outputs without communication) against
the reference backend on gloo, and it can fail: a planted error (an exponent bit) is reported with a replay
command that reproduces it."""
from __future__ import annotations

import re
import subprocess

import pytest

from soak_harness import run_soak_script

#: Small shapes, so a few dozen rounds take seconds on two cores.
SMALL = ["--backend", "reference", "--max-tokens", "48", "--max-hidden", "256"]


def _soak(*args: str) -> subprocess.CompletedProcess:
    return run_soak_script("soak_intranode.py", *args, timeout=120)


@pytest.mark.parametrize("ranks, rounds", [(2, 32), (3, 24)])
def test_soak_reference_matches_oracle(ranks: int, rounds: int, tmp_path) -> None:
    out = tmp_path / "soak.md"
    run = _soak("--ranks", str(ranks), "--rounds", str(rounds), "--seed", "7", "--out", str(out), *SMALL)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"- EP{ranks}: {rounds} of {rounds} rounds in" in run.stdout and ", 0 failed" in run.stdout, run.stdout
    report = out.read_text()
    assert f"| all rounds | {rounds} | 0 |" in report, report
    # The draw covers the features the soak claims (FP8, num_worst_tokens, a rank without tokens...).
    for feature in ("fp8", "num_worst_tokens (sum)", "num_worst_tokens (tight)", "expert_alignment > 1"):
        match = re.search(rf"^\| {re.escape(feature)} \| (\d+) \| 0 \|$", report, re.M)
        assert match and int(match.group(1)) > 0, f"no round with {feature}:\n{report}"
    assert run.stdout.rstrip().endswith(report.rstrip()), "the table must be printed last"


def test_soak_over_virtual_nodes_matches_the_forwarding_oracle(tmp_path) -> None:
    """4 ranks as 2 virtual nodes of 2 on the forwarding backend: the oracle's combine sums each node
    first (one rounding per node partial) and the layout has per-node counts."""
    args = ["--backend", "forwarding", "--ranks-per-node", "2", "--max-tokens", "48", "--max-hidden", "256"]
    run = _soak("--ranks", "4", "--rounds", "16", "--seed", "5", *args)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "- EP4: 16 of 16 rounds in" in run.stdout and ", 0 failed" in run.stdout, run.stdout
    assert "virtual nodes of 2 ranks" in run.stdout


def test_soak_catches_planted_error_and_replays_it() -> None:
    run = _soak("--ranks", "2", "--rounds", "30", "--seed", "7", "--plant-error", "combined_x", "--stop-on-failure", *SMALL)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "combine combined_x: 1 of" in run.stdout, run.stdout
    assert re.search(r"- EP2: 1 of 30 rounds in .*, 1 failed, stopped early by a failure", run.stdout), run.stdout
    replay = re.search(r"replay: python (\S+) (.*)", run.stdout)
    assert replay, run.stdout
    again = _soak(*replay.group(2).split())
    assert again.returncode == 1 and "combine combined_x: 1 of" in again.stdout, again.stdout + again.stderr
    round_index = re.search(r"--only-round (\d+)", replay.group(2)).group(1)
    assert f"FAILED round {round_index}:" in again.stdout

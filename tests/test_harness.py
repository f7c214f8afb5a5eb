"""The multi-process harness itself: a rank that never reports is killed at the deadline, after it
printed where it stood (every thread's Python stack), so that a stall is diagnosable."""
from __future__ import annotations

import time

import pytest

from harness import run_ranks


def _rank_one_stalls_in_a_named_function(rank: int, world_size: int) -> int:
    if rank == 1:
        _stalled_here_waiting_for_nothing()
    return rank


def _stalled_here_waiting_for_nothing() -> None:
    time.sleep(3600)


def test_a_stalled_rank_prints_its_stack_before_it_is_killed(capfd: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish"):
        run_ranks(_rank_one_stalls_in_a_named_function, 2, timeout_s=20)
    assert time.monotonic() - started < 60, "the stalled rank was not killed promptly"
    err = capfd.readouterr().err
    assert "ranks [1] did not report" in err, err
    assert "_stalled_here_waiting_for_nothing" in err, err  # the child's faulthandler dump

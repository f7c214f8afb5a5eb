#!/usr/bin/env python3
"""Per-range time table of a torch.profiler Chrome trace: how long dispatch, combine, experts... took.

    python scripts/trace_summary.py runs/prof/            # every *.json / *.json.gz in the folder
    python scripts/trace_summary.py rank0.json rank1.json --prefix deepep/ --prefix moe/

Reads the Chrome trace JSON that ``torch.profiler`` writes (``export_chrome_trace`` or
``tensorboard_trace_handler``; the pretraining entry's ``--profile`` writes one per rank when nsys is
not there) and prints, for every range whose name starts with one of the prefixes (default
``deepep/`` and ``moe/``, the names of ``deepep_megatron.profiling.nvtx_range``):

    range  count  total ms  mean ms  share

``share`` is the range's total time over the profiled time: the sum of the ``ProfilerStep#N``
ranges when the trace has them (torch.profiler schedules add them), otherwise each trace's span
from its first to its last event. Several files (ranks) add up, numerator and denominator alike,
so share is the average over ranks. Ranges nest (dispatch holds notify), so shares need not add
to 100 %. A range nested inside another of the same name on the same thread is counted once,
with the outer one's time.

``--kind gpu`` reads the GPU-side copies of the ranges (``gpu_user_annotation``: the kernels'
time), which CUDA traces have; the default reads the CPU-side ranges, which every trace has.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

DEFAULT_PREFIXES = ("deepep/", "moe/")
CATEGORIES = {"cpu": {"user_annotation"}, "gpu": {"gpu_user_annotation"}}


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    # Both layouts exist: {"traceEvents": [...]} (torch) and a bare list (other tools).
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ValueError(f"{path}: not a Chrome trace (no traceEvents list)")
    return events


def expand_paths(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.name.endswith((".json", ".json.gz")))
            if not found:
                raise FileNotFoundError(f"{p}: no *.json or *.json.gz trace in this folder")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def _outermost(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop intervals that lie inside an earlier one (same-name recursion on one thread)."""
    kept: list[tuple[float, float]] = []
    for start, end in sorted(intervals, key=lambda se: (se[0], -se[1])):
        if kept and end <= kept[-1][1]:
            continue
        kept.append((start, end))
    return kept


def summarize(files: list[Path], prefixes: tuple[str, ...], kind: str = "cpu") -> tuple[dict, float]:
    """Returns ({name: (count, total_us)}, profiled_us) summed over the files."""
    cats = CATEGORIES[kind]
    stats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    profiled_us = 0.0
    for path in files:
        events = [e for e in load_events(path) if e.get("ph") == "X" and "dur" in e]
        by_key: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        steps = 0.0
        for e in events:
            name, ts, dur = e.get("name", ""), float(e["ts"]), float(e["dur"])
            if name.startswith("ProfilerStep#"):
                steps += dur
            if e.get("cat") in cats and name.startswith(prefixes):
                by_key[(name, e.get("pid"), e.get("tid"))].append((ts, ts + dur))
        if steps == 0.0 and events:
            steps = max(float(e["ts"]) + float(e["dur"]) for e in events) - min(float(e["ts"]) for e in events)
        profiled_us += steps
        for (name, _pid, _tid), intervals in by_key.items():
            for start, end in _outermost(intervals):
                stats[name][0] += 1
                stats[name][1] += end - start
    return {k: (int(v[0]), v[1]) for k, v in stats.items()}, profiled_us


def format_table(stats: dict, profiled_us: float) -> str:
    rows = sorted(stats.items(), key=lambda kv: -kv[1][1])
    width = max([len("range")] + [len(k) for k in stats])
    lines = [f"{'range':<{width}}  {'count':>7}  {'total ms':>10}  {'mean ms':>9}  {'share':>7}"]
    lines.append("-" * len(lines[0]))
    for name, (count, total_us) in rows:
        share = 100.0 * total_us / profiled_us if profiled_us > 0 else float("nan")
        lines.append(f"{name:<{width}}  {count:>7d}  {total_us / 1e3:>10.3f}  "
                     f"{total_us / 1e3 / count:>9.4f}  {share:>6.1f}%")
    lines.append(f"profiled time: {profiled_us / 1e3:.3f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+", help="trace files (.json/.json.gz) or folders holding them")
    ap.add_argument("--prefix", action="append", help="range-name prefix to keep (repeatable); "
                    f"default {' '.join(DEFAULT_PREFIXES)}")
    ap.add_argument("--kind", choices=sorted(CATEGORIES), default="cpu",
                    help="cpu: CPU-side ranges (every trace); gpu: their GPU-side copies (CUDA traces)")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON instead of a table")
    args = ap.parse_args(argv)
    prefixes = tuple(args.prefix or DEFAULT_PREFIXES)
    try:
        files = expand_paths(args.traces)
        stats, profiled_us = summarize(files, prefixes, args.kind)
    except (OSError, ValueError) as e:
        print(f"trace_summary: {e}", file=sys.stderr)
        return 2
    if not stats:
        print(f"trace_summary: no {args.kind} ranges starting with {' or '.join(prefixes)} in "
              f"{len(files)} file(s); was the run profiled (--profile) over steps that reach the MoE layers?",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"files": [str(f) for f in files], "profiled_ms": profiled_us / 1e3,
                          "ranges": {k: {"count": c, "total_ms": t / 1e3, "mean_ms": t / 1e3 / c,
                                         "share": t / profiled_us if profiled_us else None}
                                     for k, (c, t) in stats.items()}}, indent=1))
    else:
        print(f"{len(files)} trace file(s), {args.kind} ranges")
        print(format_table(stats, profiled_us))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokens/s and per-iteration dispatch/combine time of the pretraining entry, one Buffer backend
against another, on this machine (issue [1/8]'s benchmark).

    python3 scripts/bench_pretrain.py --ranks 2 --backends reference,cuda --iters 40 [-- extra flags]

Each run is ``torchrun --standalone --nproc-per-node RANKS -m deepep_megatron.pretrain`` with a
small MoE GPT (override with flags after ``--``); ranks that outnumber the GPUs share them over
host-gloo (start MPS first: scripts/mps.sh). Reported: the closing summary's tokens/s, and the
mean of the logged dispatch and combine milliseconds (forward + backward, summed over MoE layers)
over the logged iterations after the first interval (warm-up). Prints one markdown table.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--mock-data", "--num-layers", "2", "--hidden-size", "1024", "--num-attention-heads", "8", "--seq-length", "512",
         "--vocab-size", "4096", "--micro-batch-size", "2", "--lr", "1e-3", "--moe-router-topk", "2", "--bf16",
         "--disable-bias-linear", "--use-distributed-optimizer", "--moe-token-dispatcher", "deepep"]
_LINE = re.compile(r"lm loss: (\S+) .*\| dispatch \(ms\): ([\d.]+) \| combine \(ms\): ([\d.]+)")
_DONE = re.compile(r"done: .* ([\d.]+) tokens/s, final loss (\S+)")


def run(ranks: int, backend: str, iters: int, log_interval: int, extra: list[str], log_path: Optional[str]) -> dict:
    argv = MODEL + ["--expert-model-parallel-size", str(ranks), "--num-experts", str(4 * ranks), "--moe-deepep-num-sms",
                    str(max(2, min(24, 132 // ranks // 2 * 2))), "--train-iters", str(iters), "--log-interval",
                    str(log_interval), "--moe-deepep-backend", backend, *extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
               "deepep_megatron.pretrain", *argv]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=900)
    if log_path:
        with open(log_path, "w") as out:
            out.write(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{backend} run failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    lines = [m.groups() for m in _LINE.finditer(done.stdout)][1:]  # skip the first interval: warm-up
    summary = _DONE.search(done.stdout)
    if not lines or summary is None:
        raise SystemExit(f"{backend} run printed no log lines or summary:\n{done.stdout[-2000:]}")
    return {
        "tokens_per_s": float(summary.group(1)),
        "final_loss": summary.group(2),
        "dispatch_ms": sum(float(d) for _, d, _ in lines) / len(lines),
        "combine_ms": sum(float(c) for _, _, c in lines) / len(lines),
        "losses": [loss for loss, _, _ in lines],
        "buffer": next((line for line in done.stdout.splitlines() if line.startswith("deepep: ")), "?"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--backends", default="reference,cuda")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument("--log-dir", default=None, help="write each run's output here")
    parser.add_argument("extra", nargs="*", help="more pretraining flags (after --)")
    args = parser.parse_args()
    rows = []
    for backend in args.backends.split(","):
        log = os.path.join(args.log_dir, f"pretrain_ep{args.ranks}_{backend}.log") if args.log_dir else None
        rows.append((backend, run(args.ranks, backend, args.iters, args.log_interval, args.extra, log)))
    same = len({tuple(r["losses"]) for _, r in rows}) == 1
    print(f"\npretraining, EP{args.ranks}, {args.iters} iterations; logged losses identical across backends: {same}")
    print("| backend | tokens/s | dispatch ms/iter | combine ms/iter | final loss | buffer |")
    print("|---|---|---|---|---|---|")
    for backend, r in rows:
        print(f"| {backend} | {r['tokens_per_s']:.0f} | {r['dispatch_ms']:.2f} | {r['combine_ms']:.2f} | {r['final_loss']} | {r['buffer']} |")


if __name__ == "__main__":
    main()

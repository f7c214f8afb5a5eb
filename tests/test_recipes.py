"""Every recipe resolves to valid pretraining arguments without a GPU (the recipes' dry run).

The launcher composes each recipe's command (DRY_RUN=print: bash only, milliseconds); one Python
process then runs the dry-run checks of all of them, so megatron-core is imported once. One recipe
also goes the whole way through `DRY_RUN=1 bash recipes/X.sbatch`, as a user runs it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
PRECISIONS = {"tiny_cpu": ["fp32"], "mixtral_8x7b": ["bf16", "fp8"], "deepseek_v3": ["bf16", "fp8"],
              "qwen3_moe": ["bf16", "fp8"]}

# find_spec, not import: importing megatron-core here would cost every test session seconds.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                                reason="the dry run builds megatron-core's model (pip install megatron-core)")


def launcher_env(**overrides: str) -> dict[str, str]:
    """The environment a recipe runs in here: no SLURM variables, and this test's interpreter as
    DEEPEP_PYTHON (never whatever python3 comes first on PATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "DEEPEP_PYTHON": sys.executable, **overrides}


def compose(recipe: str, *args: str, env: dict | None = None) -> tuple[int, list[str]]:
    """The launcher's (world size, pretraining flags) for a recipe, without running anything."""
    out = subprocess.run(["bash", str(RECIPES / f"{recipe}.sbatch"), *args], capture_output=True, text=True,
                         env=launcher_env(DRY_RUN="print", **(env or {})), timeout=30)
    assert out.returncode == 0, out.stderr
    world = int(re.search(r"world_size=(\d+)", out.stdout).group(1))
    command = shlex.split(out.stdout.split("command:", 1)[1])
    entry = command.index("deepep_megatron.pretrain")
    return world, command[entry + 1:]


# One process checks many argument lists (prints {"name": report | "ERROR: ..."} as JSON), then
# compares the dry run's parameter count with the real model built on CPU ("count check").
_BATCH = r"""
import io, json, sys
from deepep_megatron.megatron import dry_run
from deepep_megatron.megatron.arguments import build_parser
cases = json.loads(sys.stdin.read())
results = {}
for name, (world, argv) in cases.items():
    out = io.StringIO()
    try:
        dry_run.report(build_parser().parse_args(argv), world, out=out)
        results[name] = out.getvalue()
    except (ValueError, RuntimeError) as error:
        results[name] = "ERROR: " + str(error)

import torch.distributed as dist
from megatron.core import parallel_state
from deepep_megatron.megatron import cpu_compat, pretrain
args = build_parser().parse_args("--num-layers 3 --hidden-size 64 --num-attention-heads 4 --num-experts 4 "
                                 "--moe-router-topk 2 --moe-ffn-hidden-size 96 --mock-data".split())
count = dry_run.count_parameters(args, world_size=1)
dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
cpu_compat.apply()
parallel_state.initialize_model_parallel(1, 1)
model = pretrain.GPTModel(config=pretrain.build_transformer_config(args),
                          transformer_layer_spec=pretrain.build_layer_spec(args),
                          vocab_size=pretrain.padded_vocab_size(args), max_sequence_length=args.seq_length)
results["count check"] = [count.total, sum(p.numel() for p in model.parameters()), count.experts,
                          sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)]
print("@@" + json.dumps(results))
"""


def dry_run_batch(cases: dict[str, tuple[int, list[str]]]) -> dict:
    out = subprocess.run([sys.executable, "-c", _BATCH], input=json.dumps(cases), capture_output=True,
                         text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.split("@@", 1)[1])


@pytest.fixture(scope="module")
def results() -> dict:
    cases = {f"{r}/{p}": compose(r, p) for r, ps in PRECISIONS.items() for p in ps}
    # Layouts that must be refused, through the same launcher path:
    cases["mixtral_8x7b/bf16 on 3 nodes"] = compose("mixtral_8x7b", env={"NNODES": "3"})
    cases["qwen3_moe/bf16 EP=7"] = compose("qwen3_moe", "bf16", "--expert-model-parallel-size", "7")
    # TP needs sequence parallelism, which megatron's local LayerNorm refuses: take the TE variant.
    cases["mixtral_8x7b/fp8 TP=3"] = compose("mixtral_8x7b", "fp8", "--tensor-model-parallel-size", "3",
                                              "--sequence-parallel")
    cases["mixtral_8x7b/fp8 TP=2"] = compose("mixtral_8x7b", "fp8", "--tensor-model-parallel-size", "2",
                                              "--sequence-parallel")
    world, argv = compose("mixtral_8x7b")
    cases["mixtral_8x7b/bf16 without the distributed optimizer"] = (
        world, [a for a in argv if a != "--use-distributed-optimizer"])
    return dry_run_batch(cases)


@pytest.mark.parametrize("case", [f"{r}/{p}" for r, ps in PRECISIONS.items() for p in ps])
def test_recipe_dry_run_ok(results, case):
    text = results[case]
    assert "dry run OK" in text, text
    assert re.search(r"parameters: total [\d.]+ [KMB]", text), text
    assert "moe_token_dispatcher = deepep" in text
    if case.endswith("/fp8"):
        assert "fp8_format = hybrid" in text and "transformer_impl = transformer_engine" in text
        assert "fp8_recipe = blockwise" in text


def test_recipe_layouts_are_what_the_headers_say(results):
    assert "world 128 = TP 1 x DP 128; experts: EP 8" in results["mixtral_8x7b/bf16"]
    assert "world 64 = TP 1 x DP 64; experts: EP 64 x expert-TP 1 x expert-DP 1; 4 experts per rank" in results["deepseek_v3/bf16"]
    assert "world 16 = TP 1 x DP 16; experts: EP 16" in results["qwen3_moe/fp8"]
    assert "world 2 = TP 1 x DP 2; experts: EP 2" in results["tiny_cpu/fp32"]


def test_bad_layouts_are_refused_with_reasons(results):
    assert "--global-batch-size (512) must be a multiple of --micro-batch-size x data-parallel size = 1 x 24" in \
        results["mixtral_8x7b/bf16 on 3 nodes"]
    assert "--expert-model-parallel-size (7) must divide --num-experts (128)" in results["qwen3_moe/bf16 EP=7"]
    assert results["mixtral_8x7b/fp8 TP=3"].startswith("ERROR: world size 128 is not divisible by --tensor-model-parallel-size 3")
    # The entry pads the vocabulary (32001 -> a multiple of 128 x TP), so TP=2 builds.
    assert "world 128 = TP 2 x DP 64" in results["mixtral_8x7b/fp8 TP=2"]
    assert "more than 80 GiB" in results["mixtral_8x7b/bf16 without the distributed optimizer"]


def test_parameter_count_matches_the_built_model(results):
    """The dry run's count (one layer on meta, scaled to 3 layers) against the real model on CPU."""
    total, real, experts, real_experts = results["count check"]
    assert (total, experts) == (real, real_experts)


def _path_with_a_wrong_python3(tmp_path: Path) -> str:
    """PATH with a python3 first that only says it was called (and fails)."""
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\necho 'the python3 from PATH ran' >&2\nexit 97\n")
    fake.chmod(0o755)
    return f"{tmp_path}{os.pathsep}{os.environ['PATH']}"


def test_dry_run_end_to_end_through_the_recipe(tmp_path):
    """As a user runs it, with a wrong python3 first on PATH: the launcher runs DEEPEP_PYTHON."""
    env = launcher_env(DRY_RUN="1", PATH=_path_with_a_wrong_python3(tmp_path))
    out = subprocess.run(["bash", str(RECIPES / "tiny_cpu.sbatch")], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "from PATH ran" not in out.stderr, out.stderr[-3000:]
    assert "world_size=2" in out.stdout and "dry run OK" in out.stdout


def test_launcher_resolves_its_interpreter_once(tmp_path):
    command = subprocess.run(["bash", str(RECIPES / "tiny_cpu.sbatch")], capture_output=True, text=True, timeout=30,
                             env=launcher_env(DRY_RUN="print", PATH=_path_with_a_wrong_python3(tmp_path)))
    assert command.returncode == 0, command.stderr
    entry = shlex.split(command.stdout.split("command:", 1)[1])
    assert entry[:3] == [sys.executable, "-m", "deepep_megatron.pretrain"], entry[:3]
    # DEEPEP_PYTHON by name is looked up on PATH once, then used by its full path
    by_name = subprocess.run(["bash", str(RECIPES / "tiny_cpu.sbatch")], capture_output=True, text=True, timeout=30,
                             env=launcher_env(DRY_RUN="print", DEEPEP_PYTHON="python3", PATH=_path_with_a_wrong_python3(tmp_path)))
    assert shlex.split(by_name.stdout.split("command:", 1)[1])[0] == str(tmp_path / "python3")
    missing = subprocess.run(["bash", str(RECIPES / "tiny_cpu.sbatch")], capture_output=True, text=True, timeout=30,
                             env=launcher_env(DRY_RUN="print", DEEPEP_PYTHON=str(tmp_path / "no-such-python")))
    assert missing.returncode != 0 and "set DEEPEP_PYTHON" in missing.stderr, missing.stderr


def test_launcher_refuses_unknown_precision_and_direct_use():
    bad = subprocess.run(["bash", str(RECIPES / "mixtral_8x7b.sbatch"), "fp16"], capture_output=True, text=True,
                         env=launcher_env(DRY_RUN="print"), timeout=30)
    assert bad.returncode != 0 and "precisions {bf16,fp8}, not 'fp16'" in bad.stderr
    direct = subprocess.run(["bash", str(RECIPES / "launch.sh")], capture_output=True, text=True, timeout=30)
    assert direct.returncode != 0 and "source this from a recipe" in direct.stderr


def test_fp8_recipe_override_and_extra_flags_come_last():
    _, argv = compose("qwen3_moe", "fp8", "--train-iters", "7", env={"FP8_RECIPE": "mxfp8"})
    assert argv[argv.index("--fp8-recipe") + 1] == "mxfp8"
    assert argv[-2:] == ["--train-iters", "7"]  # argparse: the last occurrence wins


def test_data_path_replaces_mock_data():
    _, argv = compose("mixtral_8x7b", env={"DATA_PATH": "/data/a_text_document /data/b_text_document"})
    assert "--mock-data" not in argv
    i = argv.index("--data-path")
    assert argv[i + 1:i + 3] == ["/data/a_text_document", "/data/b_text_document"]

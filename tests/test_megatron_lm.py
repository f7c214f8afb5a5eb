"""The Megatron-LM path against Megatron-LM itself: its own argument parsing, its own
``model_provider`` + ``gpt_builder`` (what its ``pretrain_gpt.py`` trains), our flags added either
by the runner (``python -m deepep_megatron.megatron.megatron_lm pretrain_gpt.py ...``) or by the
documented one-line ``extra_args_provider`` edit.

Needs a Megatron-LM checkout named by ``MEGATRON_LM_DIR`` (e.g. ``git clone -b core_v0.19.0
https://github.com/NVIDIA/Megatron-LM``; core_v0.16.x and core_v0.19.x are the lines we support);
skipped without one (CI has no network). Its ``megatron`` package goes first on ``PYTHONPATH``, so
the megatron-core under test is the checkout's. On CPU Megatron-LM's ``pretrain()`` stops at its
"Megatron requires CUDA" check, so the step runs here through Megatron-LM's pieces on gloo
(with :mod:`deepep_megatron.megatron.cpu_compat`): one forward and backward of its GPT MoE model
at EP=2, deepep against megatron's alltoall dispatcher.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")

pytestmark = pytest.mark.skipif(
    not MEGATRON_LM_DIR or not (Path(MEGATRON_LM_DIR) / "pretrain_gpt.py").is_file(),
    reason="set MEGATRON_LM_DIR to a Megatron-LM checkout (core_v0.16.x or core_v0.19.x) to test the Megatron-LM path",
)

#: A tiny GPT MoE in Megatron-LM's own flags (CPU: no fused kernels, CPU initialization).
FLAGS = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
         "--micro-batch-size 2 --global-batch-size 4 --train-iters 3 --lr 1e-3 --mock-data "
         "--tokenizer-type NullTokenizer --vocab-size 256 --num-experts 4 --moe-router-topk 2 "
         "--moe-token-dispatcher-type alltoall --expert-model-parallel-size 2 --transformer-impl local "
         "--no-gradient-accumulation-fusion --use-cpu-initialization --no-masked-softmax-fusion "
         "--no-bias-dropout-fusion --no-bias-gelu-fusion --no-persist-layer-norm --disable-bias-linear").split()

# One rank: parse with Megatron-LM's parser (ours added by the runner's hook, or by the documented
# extra_args_provider edit), build Megatron-LM's model, one forward + backward, report as JSON.
_STEP = r"""
import json, os, sys
mlm = os.environ["MEGATRON_LM_DIR"]
sys.path.insert(0, mlm)  # pretrain_gpt.py's neighbours: gpt_builders, model_provider
sys.argv = [os.path.join(mlm, "pretrain_gpt.py"), *json.loads(os.environ["STEP_FLAGS"])]
import torch
import torch.distributed as dist
from deepep_megatron.megatron import cpu_compat, megatron_lm
from megatron.training import arguments as mlm_arguments
provider = None
if os.environ["STEP_HOOK"] == "runner":
    megatron_lm.add_flags_to_megatron_lm()
else:
    provider = megatron_lm.extra_args_provider
defaults = {"tokenizer_type": "GPT2BPETokenizer"}
dist.init_process_group("gloo")
if hasattr(mlm_arguments, "parse_and_validate_args"):  # core_v0.19+: pretrain_gpt.py parses itself
    args = mlm_arguments.parse_and_validate_args(extra_args_provider=provider, args_defaults=defaults)
else:  # core_v0.16: what pretrain() -> initialize_megatron does
    from megatron.training.global_vars import set_global_variables
    args = mlm_arguments.parse_args(provider)
    mlm_arguments.validate_args(args, defaults)
    set_global_variables(args)
cpu_compat.apply()
from megatron.core import parallel_state, tensor_parallel
parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=args.expert_model_parallel_size)
torch.manual_seed(args.seed)
tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
from gpt_builders import gpt_builder
from model_provider import model_provider
model = model_provider(gpt_builder, pre_process=True, post_process=True)
from deepep_megatron import Buffer
from deepep_megatron.megatron import iter_deepep_dispatchers
S = args.seq_length
tokens = torch.randint(0, 200, (2, S), generator=torch.Generator().manual_seed(dist.get_rank()))
mask = torch.ones(1, 1, S, S, dtype=torch.bool).triu(1)
loss = model(tokens, torch.arange(S).expand(2, S), mask, labels=torch.roll(tokens, -1, 1)).float().mean()
loss.backward()
grads = {n: p.grad.double().pow(2).sum().item() for n, p in model.named_parameters() if p.grad is not None}
import megatron.core
print("@@" + json.dumps({"rank": dist.get_rank(), "loss": loss.item(), "grads": grads, "num_sms": Buffer.num_sms,
                         "deepep_layers": len(list(iter_deepep_dispatchers(model))),
                         "mcore": megatron.core.__version__}), flush=True)
dist.destroy_process_group()
"""


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([MEGATRON_LM_DIR, str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def megatron_lm_imports() -> str:
    """Megatron-LM's training package imports here (its own needs: e.g. triton, and Python 3.12
    from core_v0.19), or the tests skip saying why. Returns its megatron-core version."""
    probe = subprocess.run([sys.executable, "-W", "ignore", "-c",
                            "import megatron.training.arguments, megatron.core; print(megatron.core.__version__)"],
                           capture_output=True, text=True, env=_env(), timeout=300)
    if probe.returncode != 0:
        pytest.skip(f"Megatron-LM at {MEGATRON_LM_DIR} does not import here: {probe.stderr.strip().splitlines()[-1]}")
    return probe.stdout.strip()


def _step(tmp_path: Path, hook: str, *extra: str) -> dict[int, dict]:
    """One forward/backward at EP=2 (two ranks); {rank: report}, with rank 0's install notices
    (lines starting ``deepep_megatron:``) under ``"notices"``."""
    script = tmp_path / "step.py"
    script.write_text(_STEP)
    env = dict(_env(), STEP_FLAGS=json.dumps([*FLAGS, *extra]), STEP_HOOK=hook, MEGATRON_LM_DIR=MEGATRON_LM_DIR)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script)], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    reports = {r["rank"]: r for r in (json.loads(line[2:]) for line in out.stdout.splitlines() if line.startswith("@@"))}
    reports[0]["notices"] = [line for line in out.stdout.splitlines() if line.startswith("deepep_megatron:")]
    return reports


def test_deepep_equals_alltoall_in_megatron_lms_own_model(tmp_path, megatron_lm_imports):
    """The runner's flags in Megatron-LM's parser; --moe-deepep-megatron puts our layer in every MoE
    layer of Megatron-LM's model (SM count: DeepEP's 20 by default, also where megatron-core 0.19
    leaves both SM fields None); losses and every gradient equal megatron's alltoall dispatcher's."""
    alltoall = _step(tmp_path, "runner")
    deepep = _step(tmp_path, "runner", "--moe-deepep-megatron")
    assert sorted(alltoall) == sorted(deepep) == [0, 1]
    assert alltoall[0]["notices"] == []  # one line from rank 0 only, and only when installed
    assert deepep[0]["notices"] == ["deepep_megatron: MoE layers use the deepep dispatcher (backend auto, FP8 dispatch off, 20 SMs)"]
    for rank in (0, 1):
        ref, got = alltoall[rank], deepep[rank]
        assert got["mcore"] == megatron_lm_imports
        assert ref["deepep_layers"] == 0 and got["deepep_layers"] == 2  # every MoE layer, none without the flag
        assert got["num_sms"] == 20
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=1e-7)
        assert got["grads"].keys() == ref["grads"].keys()  # same parameters: checkpoints interchange
        for name, value in ref["grads"].items():
            assert got["grads"][name] == pytest.approx(value, rel=1e-5, abs=1e-10), f"rank {rank} grad of {name}"


def test_documented_edit_and_sm_flags(tmp_path, megatron_lm_imports):
    """The one-line edit (extra_args_provider=megatron_lm.extra_args_provider) works at this release,
    and the SM count follows Megatron-LM's own flag: --moe-flex-dispatcher-num-sms where the release
    has it (0.19+), else --moe-deepep-num-sms."""
    new_flag = tuple(int(p) for p in megatron_lm_imports.split(".")[:2]) >= (0, 19)
    flag = "--moe-flex-dispatcher-num-sms" if new_flag else "--moe-deepep-num-sms"
    reports = _step(tmp_path, "provider", "--moe-deepep-megatron", flag, "24")
    assert [r["num_sms"] for r in reports.values()] == [24, 24]
    assert all(r["deepep_layers"] == 2 for r in reports.values())


def test_runner_help_lists_our_flags_with_pretrain_gpt(megatron_lm_imports):
    script = str(Path(MEGATRON_LM_DIR) / "pretrain_gpt.py")
    ours = subprocess.run([sys.executable, "-m", "deepep_megatron.megatron.megatron_lm", script, "--help"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    if ours.returncode != 0:
        plain = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=_env(), timeout=300)
        if plain.returncode != 0:
            pytest.skip("Megatron-LM's own `pretrain_gpt.py --help` fails at this checkout too: "
                        + plain.stderr.strip().splitlines()[-1])
    assert ours.returncode == 0, ours.stderr[-3000:]
    for flag in ("--moe-deepep-megatron", "--moe-deepep-fp8-dispatch", "--moe-deepep-backend", "--moe-deepep-num-sms"):
        assert flag in ours.stdout


def test_bad_combination_is_one_line_from_the_parser(tmp_path, megatron_lm_imports):
    """--moe-deepep-megatron with megatron's flex dispatcher: refused while parsing, one line, exit 2."""
    script = tmp_path / "parse.py"
    script.write_text(
        "import os, sys\n"
        "sys.argv = ['pretrain_gpt.py', *sys.argv[1:]]\n"
        "from deepep_megatron.megatron import megatron_lm\n"
        "from megatron.training import arguments\n"
        "arguments.parse_args(megatron_lm.extra_args_provider)\n")
    flags = [f if f != "alltoall" else "flex" for f in FLAGS]
    out = subprocess.run([sys.executable, "-W", "ignore", str(script), *flags, "--moe-deepep-megatron"],
                         capture_output=True, text=True, env=dict(_env(), RANK="0"), timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert errors == [errors[0]] and "needs --moe-token-dispatcher-type alltoall (got flex)" in errors[0], out.stderr[-2000:]

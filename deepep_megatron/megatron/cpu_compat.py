"""Run megatron-core's training pieces on a CPU-only machine (gloo), for tests and the tiny demo.

megatron-core assumes CUDA in places that a CPU run reaches: hard-coded ``device="cuda"`` scalars
(optimizer, grad clipping, the no-pipelining schedule), ``torch.cuda.current_device()`` as the
device of many tensors (router, linear layers, attention, DDP buffers, global memory buffer), CUDA
streams and events (alltoall dispatcher, DDP), the CUDA RNG tracker, a ``param.type() ==
'torch.cuda.FloatTensor'`` check in the optimizers, and (without Transformer Engine) a
``te_general_gemm`` name that ``moe_utils`` never defines.

:func:`apply` patches exactly those places and nothing else. Patches are made on megatron's module
globals (never on its files, never on ``torch`` itself, except one method swap scoped to two
optimizer constructors) and only when
CUDA is unavailable; on a GPU machine :func:`apply` changes nothing but the TE-absence fix, which is
needed there too. Every patch says what it replaces and why.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from typing import Any, Callable, Iterator

import torch

_applied = False

#: Imported before patching so that their ``torch`` global is replaced too: the training path
#: (model, DDP, optimizers, schedules, checkpointing). Modules imported later stay unpatched.
_PACKAGES_TO_PATCH = (
    "megatron.core.models.gpt",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",  # these load lazily on first save/load
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.transformer.moe.token_dispatcher",
)

_TENSOR_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn")


def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (``"cuda"``, ``"cuda:0"``, ``0``, ``torch.device("cuda")``) to CPU."""
    if device is None:
        return None
    if isinstance(device, int) or torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


def _factory_on_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> torch.Tensor:
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs CUDA
        return factory(*args, **kwargs)

    return make


class _CPUStream:
    """Stands in for ``torch.cuda.Stream``: CPU work is already ordered, so waits are no-ops."""

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_CPUEvent":
        return _CPUEvent()

    def synchronize(self) -> None:
        pass


class _CPUEvent:
    """Stands in for ``torch.cuda.Event``: always complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _CPUStream()


def _make_cpu_cuda_namespace() -> types.SimpleNamespace:
    """What ``torch.cuda`` looks like inside the patched modules: CPU device, CPU RNG, no-op
    streams. Anything not listed falls through to the real ``torch.cuda`` (see _CPUTorch)."""
    return types.SimpleNamespace(
        is_available=lambda: False,
        current_device=lambda: torch.device("cpu"),
        device_count=lambda: 0,
        Stream=lambda *a, **k: _CPUStream(),
        Event=_CPUEvent,
        stream=lambda s=None: contextlib.nullcontext(),
        current_stream=lambda *a, **k: _DEFAULT_STREAM,
        default_stream=lambda *a, **k: _DEFAULT_STREAM,
        synchronize=lambda *a, **k: None,
        empty_cache=lambda: None,
        # The RNG tracker forks "the CUDA generator"; on CPU the default generator plays that role.
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=torch.manual_seed,
        random=types.SimpleNamespace(get_rng_state=lambda *a, **k: torch.get_rng_state()),
    )


class _CPUTorch(types.ModuleType):
    """A ``torch`` look-alike for megatron modules on CPU: tensor factories put ``"cuda"`` tensors
    on the CPU and ``torch.cuda`` is :func:`_make_cpu_cuda_namespace`; every other name is torch's."""

    def __init__(self) -> None:
        super().__init__("torch")
        cuda = _make_cpu_cuda_namespace()
        self.cuda = _FallThrough(cuda, torch.cuda)
        for name in _TENSOR_FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class _FallThrough:
    """Attribute lookup in ``primary`` first, then ``fallback``."""

    def __init__(self, primary: Any, fallback: Any) -> None:
        self._primary, self._fallback = primary, fallback

    def __getattr__(self, name: str) -> Any:
        if hasattr(self._primary, name):
            return getattr(self._primary, name)
        return getattr(self._fallback, name)


_CPU_TORCH = _CPUTorch()


@contextlib.contextmanager
def _tensors_report_cuda_type() -> Iterator[None]:
    """While active, ``t.type()`` of a CPU tensor says ``torch.cuda.<X>Tensor``.

    megatron's optimizers sort parameters into fp32 / fp16 / bf16 groups by comparing
    ``param.type()`` with the CUDA type names and reject anything else, and grad clipping asserts
    ``grad.type() == 'torch.cuda.FloatTensor'``; on CPU the names lack ``.cuda``. Scoped to the
    three megatron functions wrapped in :func:`apply`.
    """
    original = torch.Tensor.type

    def cuda_type_name(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_type_name
    try:
        yield
    finally:
        torch.Tensor.type = original


def _wrap_in(context: Callable[[], contextlib.AbstractContextManager], func: Callable) -> Callable:
    @functools.wraps(func)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with context():
            return func(*args, **kwargs)

    return wrapped


def _split_sizes_as_lists(all_to_all: Callable) -> Callable:
    """gloo's ``all_to_all_single`` takes split sizes only as Python lists; the alltoall dispatcher
    passes tensors (numpy arrays after its DtoH copy on GPU, which never happens on CPU). Other
    keywords (0.19's ``use_nccl_stream``) pass through."""

    @functools.wraps(all_to_all)
    def wrapped(group, input_, output_split_sizes=None, input_split_sizes=None, **kwargs):
        def as_list(sizes):
            return sizes.tolist() if hasattr(sizes, "tolist") else sizes

        return all_to_all(group, input_, as_list(output_split_sizes), as_list(input_split_sizes), **kwargs)

    return wrapped


def _fix_missing_te_general_gemm() -> None:
    """megatron.core.transformer.moe.moe_utils imports ``te_general_gemm`` from Transformer Engine
    inside a ``try`` and later tests ``te_general_gemm is not None`` in the router's gating linear;
    without TE the name is undefined (NameError). Define it as None, the value the check expects."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _fix_distributed_optimizer_loading_without_te() -> None:
    """Two bugs of DistributedOptimizer checkpoint loading without Apex/TE (torch Adam):

    * ``state_dict()`` reads the ``step`` of torch Adam's per-param state, which a fresh optimizer
      (before its first step) does not have, so loading fails on ``assert len(steps) == 1``.
      Fix: before building the state dict to load into, create the state the way megatron's
      ``init_state_fn`` does (zero moments) plus ``step = 0``; the load overwrites all of it.
    * ``load_state_dict()`` leaves torch Adam's per-param ``step`` at the value the state had
      before loading (megatron writes the checkpoint's step into a copy of the state; it ends up
      only in ``param_groups[i]["step"]``), so the bias correction restarts after a resume. Fix:
      after loading, give each param its own ``step`` tensor holding its group's loaded step.
    """
    distrib_optimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    cls = distrib_optimizer.DistributedOptimizer
    if getattr(cls.sharded_state_dict, "_deepep_fixed", False):
        return
    original = cls.sharded_state_dict

    @functools.wraps(original)
    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, **kwargs):
        if is_loading and not self.optimizer.state:
            self.init_state_fn(self.optimizer, self.config)
            for param_state in self.optimizer.state.values():
                param_state.setdefault("step", torch.tensor(0.0))
        return original(self, model_sharded_state_dict, is_loading=is_loading, **kwargs)

    original_load = cls.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        for group in self.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                if param in self.optimizer.state:
                    self.optimizer.state[param]["step"] = torch.tensor(float(group["step"]))
        return result

    sharded_state_dict._deepep_fixed = True
    cls.sharded_state_dict = sharded_state_dict
    cls.load_state_dict = load_state_dict


def apply() -> bool:
    """Apply the shims (idempotent). Returns True when the CPU shims are active.

    Call before building models/optimizers. The two TE-absence fixes apply on any machine without
    Transformer Engine; the CPU shims only when ``torch.cuda.is_available()`` is False.
    """
    global _applied
    _fix_missing_te_general_gemm()
    _fix_distributed_optimizer_loading_without_te()
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    # megatron-core puts tensors on "cuda" / torch.cuda.current_device() in ~40 places (router,
    # linear layers, attention, DDP buffers, optimizer scalars, schedules) and uses CUDA streams
    # in a few: give every loaded megatron.core module the CPU look-alike of torch.
    for name in _PACKAGES_TO_PATCH:
        importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = _CPU_TORCH

    random = importlib.import_module("megatron.core.tensor_parallel.random")
    # The tracker reads/writes "the CUDA RNG state" through these two helpers, which call
    # torch.cuda.default_generators / _lazy_call (a no-op queue without CUDA): use the CPU generator.
    random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    dispatcher.all_to_all = _split_sizes_as_lists(dispatcher.all_to_all)

    distrib_optimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    build_groups = distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups
    distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups = staticmethod(
        _wrap_in(_tensors_report_cuda_type, build_groups)
    )
    float16_init = optimizer.Float16OptimizerWithFloat16Params.__init__
    optimizer.Float16OptimizerWithFloat16Params.__init__ = _wrap_in(_tensors_report_cuda_type, float16_init)
    # optimizer.py imported clip_grad_by_total_norm_fp32 by name: rebind it there.
    optimizer.clip_grad_by_total_norm_fp32 = _wrap_in(_tensors_report_cuda_type, optimizer.clip_grad_by_total_norm_fp32)
    _applied = True
    return True

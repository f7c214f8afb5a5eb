"""Everything that differs between the megatron-core versions we support, in one place.

Supported: 0.16.x (Python 3.11; tested in CI) and 0.19.x (Python >= 3.12; the GPU machines).
Differences handled here:

* MoE module spec: in 0.16 ``layer_spec.submodules.mlp`` is a ``ModuleSpec(module=MoELayer, ...)``;
  in 0.19 it may be a ``functools.partial(MoELayer, submodules=...)``. :func:`replace_moe_layer`
  swaps the MoE class in either form (and in a block spec's ``layer_specs``).
* ``moe_utils.permute`` returns 3 values in 0.16 and 5 in 0.19 (pad offsets and padded counts
  added): :func:`permute` returns the first three in both.
* Default process groups of an MoE layer: ``moe_utils.get_default_pg_collection`` (0.16) or
  ``ProcessGroupCollection.use_mpu_process_groups`` (newer): :func:`default_moe_pg_collection`.
* The dispatcher's SM count: ``moe_deepep_num_sms`` (0.16, default 20) became
  ``moe_flex_dispatcher_num_sms`` (0.19, both default None, the old one deprecated):
  :func:`dispatcher_num_sms` reads either, :func:`num_sms_config_field` sets the right one.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import megatron.core

from .arguments import DEFAULT_NUM_SMS, check_num_sms

#: (major, minor) of the installed megatron-core.
MCORE_VERSION: tuple[int, int] = tuple(int(p) for p in megatron.core.__version__.split(".")[:2])  # type: ignore[assignment]
MIN_SUPPORTED = (0, 16)


def check_version() -> None:
    """Refuse megatron-core older than 0.16 with a clear message."""
    if MCORE_VERSION < MIN_SUPPORTED:
        raise ImportError(
            f"deepep_megatron.megatron needs megatron-core >= 0.16, found {megatron.core.__version__}; "
            "pip install 'megatron-core>=0.16.1'"
        )


check_version()  # before the imports below, which older releases may not have

from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

#: TransformerConfig's SM-count field: 0.19 unified the per-backend knobs into this one and
#: deprecated ``moe_deepep_num_sms`` (default None there; 20 in 0.16, which lacks the new field).
NUM_SMS_FIELD = ("moe_flex_dispatcher_num_sms" if "moe_flex_dispatcher_num_sms" in TransformerConfig.__dataclass_fields__
                 else "moe_deepep_num_sms")


def num_sms_config_field(num_sms: int) -> dict[str, int]:
    """The TransformerConfig keyword that sets the dispatcher's SM count on this megatron-core."""
    return {NUM_SMS_FIELD: num_sms}


def dispatcher_num_sms(config: Any) -> int:
    """The SM count a config (or Megatron-LM's parsed flags: same field names) asks the deepep
    dispatcher for, checked (``ValueError`` naming the flag that set it).

    ``--moe-flex-dispatcher-num-sms`` (0.19+) wins over the deprecated ``--moe-deepep-num-sms``
    (0.19 routes the old one into the new one, 0.16 only has the old one); neither set (0.19's
    default): DeepEP's default of :data:`~deepep_megatron.megatron.arguments.DEFAULT_NUM_SMS`.
    """
    for field in ("moe_flex_dispatcher_num_sms", "moe_deepep_num_sms"):
        value = getattr(config, field, None)
        if value is not None:
            return check_num_sms(value, "--" + field.replace("_", "-"))
    return DEFAULT_NUM_SMS


def default_moe_pg_collection() -> ProcessGroupCollection:
    """The process groups an MoE layer uses when none are passed: parallel_state's."""
    try:
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    except ImportError:  # newer releases dropped the MoE-specific helper
        return ProcessGroupCollection.use_mpu_process_groups()
    return get_default_pg_collection()


def permute(*args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
    """megatron's ``moe_utils.permute``: ``(permuted tokens, permuted probs, reverse mapping)``."""
    result = moe_utils.permute(*args, **kwargs)
    return result[0], result[1], result[2]


def _is_plain_moe_layer(module: Any, replacement: type) -> bool:
    return isinstance(module, type) and issubclass(module, MoELayer) and not issubclass(module, replacement)


def replace_moe_layer(spec: Any, replacement: type) -> Any:
    """Return a copy of ``spec`` in which every ``MoELayer`` is built as ``replacement`` instead.

    ``spec`` may be a layer ``ModuleSpec``, an MoE ``ModuleSpec`` / ``functools.partial``, or a
    block spec with ``layer_specs`` (``TransformerBlockSubmodules``). Dense layers are kept as
    they are. Raises ``ValueError`` when no MoE layer is found (the spec was built without
    ``num_experts``).
    """
    found = []

    def visit(node: Any) -> Any:
        if isinstance(node, ModuleSpec):
            if _is_plain_moe_layer(node.module, replacement):
                found.append(node)
                return dataclasses.replace(node, module=replacement)
            if node.submodules is not None and dataclasses.is_dataclass(node.submodules):
                return dataclasses.replace(node, submodules=visit(node.submodules))
            return node
        if isinstance(node, functools.partial):
            if _is_plain_moe_layer(node.func, replacement):
                found.append(node)
                return functools.partial(replacement, *node.args, **node.keywords)
            if "submodules" in node.keywords:
                keywords = dict(node.keywords, submodules=visit(node.keywords["submodules"]))
                return functools.partial(node.func, *node.args, **keywords)
            return node
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            if hasattr(node, "layer_specs"):  # TransformerBlockSubmodules
                return dataclasses.replace(node, layer_specs=[visit(s) for s in node.layer_specs])
            if hasattr(node, "mlp"):  # TransformerLayerSubmodules
                return dataclasses.replace(node, mlp=visit(node.mlp))
        return node

    result = visit(spec)
    if not found:
        raise ValueError(
            "the spec contains no MoELayer to replace; build it with num_experts set "
            "(e.g. get_gpt_layer_local_spec(num_experts=...))"
        )
    return result

"""Transformer Engine FP8 recipes: from Megatron-LM-style flags to megatron-core's config.

megatron-core builds the TE recipe object itself (``megatron.core.fp8_utils.get_fp8_recipe``) and
wraps each layer in TE's ``fp8_autocast`` when ``config.fp8`` is set, so the flags only need to set
``TransformerConfig.fp8`` / ``fp8_recipe`` and pick the TE layer spec. This module owns that
mapping, the Transformer Engine presence check, and the one decision that concerns us: whether the
recipe's scaling granularity matches our FP8 dispatch (one scale per 128 channels of a token).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

FP8_FORMATS = ("e4m3", "hybrid")


@dataclass(frozen=True)
class FP8Recipe:
    """One ``--fp8-recipe`` choice.

    Attributes:
        name: the flag value, also megatron-core's ``Fp8Recipe`` value.
        te_recipe_class: the ``transformer_engine.common.recipe`` class megatron-core builds for it.
        dispatch_in_fp8: the recipe quantizes activations per token in 128-channel blocks, as our
            FP8 dispatch does, so activations can travel in FP8 without changing the numerics.
    """

    name: str
    te_recipe_class: str
    dispatch_in_fp8: bool


FP8_RECIPES: dict[str, FP8Recipe] = {
    r.name: r
    for r in (
        FP8Recipe("delayed", "DelayedScaling", dispatch_in_fp8=False),  # per-tensor, amax history
        FP8Recipe("tensorwise", "Float8CurrentScaling", dispatch_in_fp8=False),  # per-tensor, current
        FP8Recipe("blockwise", "Float8BlockScaling", dispatch_in_fp8=True),  # 1x128 activation blocks
        FP8Recipe("mxfp8", "MXFP8BlockScaling", dispatch_in_fp8=False),  # 1x32 blocks, E8M0 scales
    )
}


def fp8_dispatch(explicit: bool, fp8_training: bool, recipe_name: Optional[str]) -> bool:
    """Whether the deepep dispatcher sends activations as FP8: asked for (``--moe-deepep-fp8-dispatch``),
    or FP8 training whose recipe scales activations per 1x128 block, the dispatch's own format."""
    recipe = FP8_RECIPES.get(recipe_name or "")
    return bool(explicit) or (fp8_training and recipe is not None and recipe.dispatch_in_fp8)


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def require_transformer_engine(flag: str) -> None:
    """Fail with a clear message when ``flag`` needs Transformer Engine and it is not installed."""
    if not have_transformer_engine():
        raise RuntimeError(
            f"{flag} needs NVIDIA Transformer Engine, which is not installed (it has no CPU build). "
            "On a CUDA machine: pip install --no-build-isolation 'transformer-engine[pytorch]'; "
            "or drop the FP8 flags and use --transformer-impl local"
        )


def resolve_fp8(
    transformer_impl: str, fp8_format: Optional[str], fp8_recipe: str
) -> tuple[Optional[str], Optional[FP8Recipe]]:
    """Check the FP8 flags and return ``(config.fp8, recipe)`` (both None without ``--fp8-format``).

    Raises ``ValueError`` for inconsistent flags and ``RuntimeError`` when TE is missing.
    """
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"--fp8-recipe must be one of {sorted(FP8_RECIPES)}, got {fp8_recipe!r}")
    if fp8_format is None:
        return None, None
    if fp8_format not in FP8_FORMATS:
        raise ValueError(f"--fp8-format must be one of {FP8_FORMATS}, got {fp8_format!r}")
    if transformer_impl != "transformer_engine":
        raise ValueError(
            f"--fp8-format {fp8_format} needs --transformer-impl transformer_engine (FP8 GEMMs are "
            f"Transformer Engine's); got --transformer-impl {transformer_impl}"
        )
    require_transformer_engine(f"--fp8-format {fp8_format}")
    return fp8_format, FP8_RECIPES[fp8_recipe]

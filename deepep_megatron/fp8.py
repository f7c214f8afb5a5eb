"""Per-token, per-128-channel FP8 (e4m3) quantization, as DeepEP's FP8 dispatch carries it.

A row of ``hidden`` values is cut into blocks of 128 channels; each block gets one fp32 scale so that
its largest magnitude maps to the e4m3 maximum (448). ``x ~= x_fp8.float() * scale`` per block.
With ``use_ue8m0`` the scales are rounded up to powers of two (UE8M0, as Blackwell MXFP8 and
DeepSeek's recipe use): the quantized values then carry the full mantissa and rescaling is exact.
:func:`pack_ue8m0` / :func:`unpack_ue8m0` convert such scales to and from DeepEP's packed form (the
8-bit exponent of four consecutive scales in one int32).
"""
from __future__ import annotations

import torch

from .config import FP8_BLOCK

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
#: Smallest block amax used for the scale, so an all-zero block gets a finite scale.
_MIN_AMAX = 1e-4


def _check_fp8_hidden(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [num_tokens, hidden], got shape {tuple(x.shape)}")
    if x.size(1) % FP8_BLOCK != 0:
        raise ValueError(f"{name}.size(1) (hidden={x.size(1)}) must be divisible by {FP8_BLOCK} for FP8; pad hidden")


def round_up_to_power_of_two(values: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= each positive fp32 value, from its exponent and mantissa bits
    (``exp2(ceil(log2(v)))`` in fp32 can round a value just above a power of two down)."""
    mantissa, exponent = torch.frexp(values)  # values = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(values), exponent - (mantissa == 0.5).to(exponent.dtype))


def per_token_cast_to_fp8(
    x: torch.Tensor, use_ue8m0: bool = False, round_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [T, H] (bf16/fp16/fp32) to ``(x_fp8 [T, H] e4m3, scales [T, H/128] fp32)``.

    ``round_scale`` or ``use_ue8m0`` round each scale up to a power of two.
    """
    _check_fp8_hidden(x, "x")
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise TypeError(f"x must be a bf16/fp16/fp32 tensor to quantize, got {x.dtype}")
    num_tokens, hidden = x.shape
    blocks = x.float().view(num_tokens, hidden // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=2).clamp(min=_MIN_AMAX)
    scales = amax / FP8_MAX
    if use_ue8m0 or round_scale:
        scales = round_up_to_power_of_two(scales)
    x_fp8 = (blocks / scales.unsqueeze(2)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8.view(num_tokens, hidden), scales.contiguous()


def per_token_cast_back(
    x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Dequantize ``(x_fp8 [..., H], scales [..., H/128])`` back to ``dtype``."""
    if x_fp8.dtype != FP8_DTYPE:
        raise TypeError(f"x_fp8 must be {FP8_DTYPE}, got {x_fp8.dtype}")
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    hidden = x_fp8.size(-1)
    if hidden % FP8_BLOCK != 0 or scales.shape != (*x_fp8.shape[:-1], hidden // FP8_BLOCK):
        raise ValueError(
            f"scales must have shape {(*x_fp8.shape[:-1], hidden // FP8_BLOCK)} for x_fp8 of shape {tuple(x_fp8.shape)}, "
            f"got {tuple(scales.shape)}"
        )
    blocks = x_fp8.float().view(*x_fp8.shape[:-1], hidden // FP8_BLOCK, FP8_BLOCK)
    return (blocks * scales.unsqueeze(-1)).view(x_fp8.shape).to(dtype)


#: UE8M0 scales one packed int32 holds (one exponent byte each).
UE8M0_PER_INT32 = 4


def pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """Pack power-of-two fp32 ``scales`` [..., G] into int32 [..., ceil(G / 4)]: byte ``i`` (little
    end first) of word ``j`` is the biased 8-bit exponent of scale ``4j + i`` (0 past ``G``)."""
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    exponents = (scales.contiguous().view(torch.int32) >> 23) & 0xFF
    if not torch.equal(exponents << 23, scales.view(torch.int32)):
        raise ValueError("pack_ue8m0 needs positive power-of-two scales (cast with round_scale=True or use_ue8m0=True)")
    groups = scales.size(-1)
    padded = torch.zeros(*scales.shape[:-1], -(-groups // UE8M0_PER_INT32) * UE8M0_PER_INT32, dtype=torch.int32, device=scales.device)
    padded[..., :groups] = exponents
    words = padded.view(*scales.shape[:-1], padded.size(-1) // UE8M0_PER_INT32, UE8M0_PER_INT32)  # no -1: 0 rows
    packed = torch.zeros(words.shape[:-1], dtype=torch.int32, device=scales.device)
    for byte in range(UE8M0_PER_INT32):  # the bytes never overlap: OR them in place
        packed |= words[..., byte] << (8 * byte)
    return packed


def unpack_ue8m0(packed: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_ue8m0`: int32 [..., W] -> fp32 scales [..., num_groups]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {packed.dtype}")
    shifts = torch.arange(UE8M0_PER_INT32, dtype=torch.int32, device=packed.device) * 8
    exponents = (packed.unsqueeze(-1) >> shifts) & 0xFF
    exponents = exponents.reshape(*packed.shape[:-1], packed.size(-1) * UE8M0_PER_INT32)[..., :num_groups].contiguous()
    return (exponents << 23).view(torch.float32)

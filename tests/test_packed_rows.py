"""The packed-row helpers of backends/reference.py (pack_rows, unpack_rows, take_rows, cat_rows,
copy_rows, as_words): whichever way they copy (int64 words where widths, strides and offsets allow,
bytes elsewhere) they give the bytes the plain byte operations give, on rows of every width, empty
and one-row tensors, slices at odd offsets and strided views.
"""
from __future__ import annotations

import pytest
import torch

from deepep_megatron.backends.reference import (
    _spec,
    as_words,
    cat_rows,
    copy_rows,
    pack_rows,
    take_rows,
    unpack_rows,
    word_view,
)

ROW_COUNTS = [0, 1, 2, 37]


def _columns(num_rows: int, g: torch.Generator) -> list[torch.Tensor]:
    """Columns of a forwarding row and odd ones: bf16, fp32, int64, bool, FP8 bytes, a strided view."""
    wide = torch.randn(num_rows, 10, generator=g)
    return [
        torch.randn(num_rows, 64, generator=g).to(torch.bfloat16),
        torch.randn(num_rows, 3, generator=g),
        torch.randint(-9, 9, (num_rows, 2), generator=g),
        torch.rand(num_rows, 5, generator=g) > 0.5,
        torch.randint(0, 256, (num_rows, 24), generator=g, dtype=torch.uint8),
        wide[:, ::2],  # non-contiguous
        torch.zeros(num_rows, 0, dtype=torch.uint8),
    ]


def _width(t: torch.Tensor) -> int:
    """Bytes of one row of ``t`` [N, ...]."""
    return int(torch.tensor(t.shape[1:]).prod()) * t.element_size()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(t.size(0), -1).view(torch.uint8) if t.numel() else \
        torch.empty(t.size(0), _width(t), dtype=torch.uint8)


@pytest.mark.parametrize("pad", [0, 3], ids=["odd width", "width of whole words"])
@pytest.mark.parametrize("num_rows", ROW_COUNTS)
def test_pack_and_unpack_give_the_bytes_of_a_plain_cat(num_rows: int, pad: int) -> None:
    """205-byte rows (read bytewise) and 208-byte ones (the columns at word offsets read as words)."""
    g = torch.Generator().manual_seed(num_rows)
    columns = _columns(num_rows, g) + [torch.randint(0, 256, (num_rows, pad), generator=g, dtype=torch.uint8)]
    rows = pack_rows(columns)
    widths = [_width(t) for t in columns]
    assert rows.shape == (num_rows, sum(widths)) and rows.dtype == torch.uint8
    if num_rows:
        assert torch.equal(rows, torch.cat([_bytes(t) for t in columns], dim=1))
    # the whole rows, a slice at a word offset (128) and one at an odd offset (140)
    for first, start in enumerate([0, widths[0], widths[0] + widths[1]]):
        back = unpack_rows(rows[:, start:], [_spec(t) for t in columns[first:]])
        for got, want in zip(back, columns[first:]):
            assert got.dtype == want.dtype and torch.equal(got, want) and got.is_contiguous()


@pytest.mark.parametrize("width", [8, 13, 16, 48])
@pytest.mark.parametrize("num_rows", ROW_COUNTS)
def test_take_cat_and_copy_rows_equal_the_byte_operations(num_rows: int, width: int) -> None:
    g = torch.Generator().manual_seed(100 * num_rows + width)
    storage = torch.randint(0, 256, (num_rows * (width + 8) + 3,), generator=g, dtype=torch.uint8)
    views = {
        "contiguous": storage[:num_rows * width].view(num_rows, width),
        "odd offset": storage[3:3 + num_rows * width].view(num_rows, width),
        "strided": storage[:num_rows * (width + 8)].view(num_rows, width + 8)[:, 8:],
    }
    index = torch.randint(0, max(num_rows, 1), (2 * num_rows,), generator=g) if num_rows else torch.empty(0, dtype=torch.int64)
    for name, rows in views.items():
        words = as_words(rows)
        assert torch.equal(words if words.dtype == torch.uint8 else words.view(torch.uint8), rows), name
        assert words.dtype == (torch.int64 if num_rows and width % 8 == 0 else torch.uint8), name
        assert torch.equal(take_rows(rows, index), rows[index]), name
        assert torch.equal(cat_rows([rows, rows[:0], rows.flip(0)]), torch.cat([rows, rows.flip(0)])), name
        target = torch.zeros(num_rows, width + 16, dtype=torch.uint8)[:, 16:]
        copy_rows(target, rows)
        assert torch.equal(target, rows), name


def test_word_view_only_where_a_view_is_exact() -> None:
    rows = torch.arange(64, dtype=torch.uint8).view(4, 16)
    assert word_view(rows) is not None and word_view(rows).shape == (4, 2)
    assert word_view(rows[:, :12]) is None  # width not a multiple of 8
    assert word_view(rows[:, 4:12]) is None  # offset 4
    assert word_view(rows[:, 8:]) is not None  # offset 8, stride 16
    assert word_view(rows[:0]) is None and word_view(rows[:, :0]) is None

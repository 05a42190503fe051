"""``pad_ids``: the one place token rows become a batch's (input_ids, attention_mask)."""

from __future__ import annotations

import torch
from sie_server.adapters.hf import pad_ids


def test_rows_are_right_padded_with_the_pad_id_and_masked() -> None:
    rows = [[101, 7592, 102], [101, 102], [101, 2023, 2003, 1037, 102], [5]]
    ids, mask = pad_ids(rows, 0, "cpu")
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [
        [101, 7592, 102, 0, 0],
        [101, 102, 0, 0, 0],
        [101, 2023, 2003, 1037, 102],
        [5, 0, 0, 0, 0],
    ]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_a_non_zero_pad_id_an_empty_row_and_ids_past_32_bits() -> None:
    big = 2**40  # long, not int32: no id is ever cut
    ids, mask = pad_ids([[big, 3], []], 1, "cpu")
    assert ids.tolist() == [[big, 3], [1, 1]]
    assert mask.tolist() == [[1, 1], [0, 0]]


def test_each_call_gets_tensors_of_its_own() -> None:
    rows = [[4, 5, 6]]
    first, _ = pad_ids(rows, 0, "cpu")
    second, _ = pad_ids(rows, 0, "cpu")
    first[0, 0] = 99
    assert second.tolist() == [[4, 5, 6]]
    assert rows == [[4, 5, 6]]


def test_the_mask_covers_only_the_attended_ids() -> None:
    """ColBERT's queries: [MASK] ids the model reads, outside the attention mask."""
    ids, mask = pad_ids([[101, 7, 102, 103, 103], [101, 102]], 103, "cpu", attended=[3, 2])
    assert ids.tolist() == [[101, 7, 102, 103, 103], [101, 102, 103, 103, 103]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]

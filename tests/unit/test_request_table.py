"""The worker's column-wise request state (shoal.worker.request_table)."""
from __future__ import annotations

import numpy as np
import pytest

from shoal.worker.request_table import RequestTable, ragged_index


def test_ragged_index():
    rows, offsets = ragged_index(np.asarray([2, 0, 3]))
    assert rows.tolist() == [0, 0, 2, 2, 2]
    assert offsets.tolist() == [0, 1, 0, 1, 2]


def test_deltas_apply_as_columns_and_rows_and_columns_grow():
    table = RequestTable(rows=2, token_columns=4, page_columns=1)
    reference = {}
    rng = np.random.default_rng(0)
    for rid in range(5):  # more requests than rows: the table doubles
        prompt = rng.integers(0, 100, size=rid + 1).astype(np.int32)
        table.add(rid, prompt, [rid], num_computed=0)
        reference[rid] = (prompt.tolist(), [rid])
    for step in range(12):  # ragged appends, past the first column capacity
        ids = [r for r in reference if (r + step) % 3]
        counts = rng.integers(0, 3, size=len(ids))
        tokens = rng.integers(0, 100, size=int(counts.sum())).astype(np.int32)
        slots = table.slots(ids)
        table.append_tokens(slots, counts, tokens)
        table.append_pages(slots, counts, tokens)
        first = 0
        for rid, count in zip(ids, counts.tolist()):
            reference[rid][0].extend(tokens[first : first + count].tolist())
            reference[rid][1].extend(tokens[first : first + count].tolist())
            first += count
    for rid, (tokens, pages) in reference.items():
        slot = table.slot_of[rid]
        assert table.token_ids(slot).tolist() == tokens
        assert table.page_ids(slot).tolist() == pages


def test_slots_follow_removal_and_reuse_and_name_unknown_ids():
    table = RequestTable(rows=2)
    table.add(7, np.asarray([1, 2], np.int32), [0], 0)
    table.add(8, np.asarray([3], np.int32), [1], 0)
    ids = [7, 8]
    first = table.slots(ids).tolist()
    assert table.slots(ids).tolist() == first  # the kept answer
    table.remove(7)
    with pytest.raises(KeyError, match="request 7"):
        table.slots(ids)
    table.add(9, np.asarray([4], np.int32), [2], 0)  # takes 7's row
    assert table.slots([9, 8]).tolist() == [first[0], first[1]]
    assert table.token_ids(table.slot_of[9]).tolist() == [4]
    table.add(8, np.asarray([5, 6], np.int32), [3], 1)  # sent again after a preemption
    assert table.token_ids(table.slot_of[8]).tolist() == [5, 6]
    assert int(table.num_computed[table.slot_of[8]]) == 1


def test_drafts_sit_past_the_tokens_uncounted():
    table = RequestTable(rows=1, token_columns=2)
    slot = table.add(1, np.asarray([10, 11], np.int32), [0], 1)
    table.put_drafts(slot, [12, 13, 14])
    assert table.token_ids(slot).tolist() == [10, 11]
    assert table.tokens[slot, :5].tolist() == [10, 11, 12, 13, 14]

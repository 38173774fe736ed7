"""The requests a worker holds, as numpy columns indexed by slot.

A plan's deltas (``CachedRequests``) are columns; so is this state, and applying
one to the other is a few array operations whatever the batch size, instead of a
Python loop over the running requests. Each request held gets a slot (a row):

- ``tokens[slot, :num_tokens[slot]]`` its prompt and output token ids; draft tokens
  being verified sit just past ``num_tokens`` (written, not counted);
- ``pages[slot, :num_pages[slot]]`` its page table;
- ``num_computed[slot]`` tokens whose KV is in the cache on this rank.

Rows and columns grow by doubling, so a request's tokens or pages are copied
O(log n) times over its life. Everything that is rare or ragged per request
(sampling state, grammars, pooling) stays in the runner's per-request objects.
"""
from __future__ import annotations

import numpy as np

_I32 = np.int32
_I64 = np.int64


def ragged_index(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows owning ``counts[i]`` consecutive entries: (row of each entry, index in its row)."""
    total = int(counts.sum())
    rows = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    return rows, np.arange(total) - starts[rows]


class RequestTable:
    """Token ids, page tables and computed counts of every request a worker holds."""

    def __init__(self, rows: int = 64, token_columns: int = 256, page_columns: int = 16):
        self.slot_of: dict[int, int] = {}
        self._last: tuple[list[int], np.ndarray] = ([], np.zeros(0, _I64))  # see slots()
        self._free = list(range(rows - 1, -1, -1))
        self.tokens = np.zeros((rows, token_columns), _I32)
        self.num_tokens = np.zeros(rows, _I64)
        self.pages = np.zeros((rows, page_columns), _I32)
        self.num_pages = np.zeros(rows, _I64)
        self.num_computed = np.zeros(rows, _I64)

    def __len__(self) -> int:
        return len(self.slot_of)

    def __contains__(self, req_id: int) -> bool:
        return req_id in self.slot_of

    # -- requests in and out -------------------------------------------------------------------

    def add(self, req_id: int, token_ids: np.ndarray, page_ids: list[int],
            num_computed: int) -> int:
        """Hold a new request (or one sent again after preemption); returns its slot."""
        if req_id in self.slot_of:
            self.remove(req_id)
        if not self._free:
            self._grow_rows()
        slot = self._free.pop()
        self.slot_of[req_id] = slot
        self._last = ([], self._last[1][:0])
        self.num_tokens[slot] = self.num_pages[slot] = 0
        self.num_computed[slot] = num_computed
        self.append_tokens(np.asarray([slot]), np.asarray([len(token_ids)]),
                           np.asarray(token_ids, _I32))
        self.append_pages(np.asarray([slot]), np.asarray([len(page_ids)]),
                          np.asarray(page_ids, _I32))
        return slot

    def remove(self, req_id: int) -> None:
        slot = self.slot_of.pop(req_id, None)
        if slot is not None:
            self._free.append(slot)
            self._last = ([], self._last[1][:0])

    def slots(self, req_ids: list[int]) -> np.ndarray:
        """Slots of ``req_ids``, int64; KeyError names an unknown id.

        The last answer is kept: a decode step asks for the same ids twice (its deltas,
        then its batch), and list equality is cheaper than the lookups.
        """
        last_ids, last_slots = self._last
        if req_ids == last_ids:
            return last_slots
        try:
            slots = np.fromiter(map(self.slot_of.__getitem__, req_ids), _I64, len(req_ids))
        except KeyError as exc:
            raise KeyError(f"request {exc.args[0]} is not held by this worker") from None
        self._last = (req_ids, slots)
        return slots

    # -- deltas ---------------------------------------------------------------------------------

    def append_tokens(self, slots: np.ndarray, counts: np.ndarray, token_ids: np.ndarray) -> None:
        """Row ``slots[i]`` gets the next ``counts[i]`` entries of ``token_ids``."""
        if not len(token_ids):
            return
        if len(token_ids) == len(slots) and counts.min() == 1:  # one each (a decode step)
            ends = self.num_tokens[slots]
            self._fit_tokens(int(ends.max()) + 1)
            self.tokens[slots, ends] = token_ids
            self.num_tokens[slots] = ends + 1
            return
        self._fit_tokens(int((self.num_tokens[slots] + counts).max()))
        rows, offsets = ragged_index(counts)
        where = slots[rows]
        self.tokens[where, self.num_tokens[where] + offsets] = token_ids
        self.num_tokens[slots] += counts  # (slots are distinct)

    def append_pages(self, slots: np.ndarray, counts: np.ndarray, page_ids: np.ndarray) -> None:
        if not len(page_ids):
            return
        need = int((self.num_pages[slots] + counts).max())
        if need > self.pages.shape[1]:
            self.pages = _widen(self.pages, need)
        rows, offsets = ragged_index(counts)
        where = slots[rows]
        self.pages[where, self.num_pages[where] + offsets] = page_ids
        self.num_pages[slots] += counts

    def put_drafts(self, slot: int, drafts: list[int]) -> None:
        """Draft tokens to verify, just past the request's tokens (not counted as its own)."""
        start = int(self.num_tokens[slot])
        self._fit_tokens(start + len(drafts))
        self.tokens[slot, start : start + len(drafts)] = drafts

    def _fit_tokens(self, columns: int) -> None:
        if columns > self.tokens.shape[1]:
            self.tokens = _widen(self.tokens, columns)

    def _grow_rows(self) -> None:
        rows = len(self.num_tokens)
        self.tokens = np.concatenate([self.tokens, np.zeros_like(self.tokens)])
        self.pages = np.concatenate([self.pages, np.zeros_like(self.pages)])
        for name in ("num_tokens", "num_pages", "num_computed"):
            column = getattr(self, name)
            setattr(self, name, np.concatenate([column, np.zeros_like(column)]))
        self._free = list(range(2 * rows - 1, rows - 1, -1))

    # -- one request (rare paths) -----------------------------------------------------------------

    def token_ids(self, slot: int) -> np.ndarray:
        return self.tokens[slot, : self.num_tokens[slot]]

    def page_ids(self, slot: int) -> np.ndarray:
        return self.pages[slot, : self.num_pages[slot]]


def _widen(array: np.ndarray, columns: int) -> np.ndarray:
    """``array`` with at least ``columns`` columns (doubling), old entries kept."""
    width = array.shape[1]
    while width < columns:
        width *= 2
    wider = np.zeros((array.shape[0], width), array.dtype)
    wider[:, : array.shape[1]] = array
    return wider

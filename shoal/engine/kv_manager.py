"""Logical KV pages on the driver: reference counts, a free queue, prefix caching.

The manager owns page ids ``0..num_pages-1``; every worker holds the physical
pages with the same ids in its own KV slab. Nothing here touches tensors.

- Reference counts: a page shared by n live requests (a common prefix) has ref n.
- Free queue, in eviction order: freed pages go to the tail, allocation takes
  from the head (LRU). A freed page keeps its hash, so a later request can still
  hit it until the page is taken for new tokens; then its hash entry is dropped.
- Prefix caching: a full page is keyed by a chained hash,
  ``sha256(parent page's hash || the page's token ids as int64)``. SHA-256 (not
  Python's ``hash``) so that no crafted prompt can collide with another user's
  prefix; the page's token tuple is stored as well and compared on every hit, as
  a guard against any collision all the same.
- Running out of pages is an expected outcome: ``allocate_slots`` returns None
  and the scheduler preempts. It never raises for that.

Modelled on vLLM V1's KVCacheManager / BlockPool (vllm/v1/core/).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from shoal.engine.request import Request

_ROOT_HASH = b""  # the parent of a request's first page


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_page(parent_hash: bytes, token_ids: tuple[int, ...]) -> bytes:
    """Chained hash of one full page: SHA-256 over the parent hash and the token ids."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


@dataclass
class PrefixCacheStats:
    """Prefix-cache lookups, in tokens, counted once per admission of a request."""

    queries: int = 0  # tokens of requests looked up
    hits: int = 0  # of those, tokens found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    """Allocates logical KV pages to requests, with prefix caching.

    Args:
        num_pages: pages in the cache (the minimum over ranks).
        page_size: tokens per page (``--block-size``).
        enable_prefix_caching: look up and register full pages by hash.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"num_pages and page_size must be positive, got {num_pages} and {page_size}"
            )
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._ref_counts = [0] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))
        # prefix cache: hash -> page, and per page its (hash, token ids) or None
        self._cached_pages: dict[bytes, int] = {}
        self._page_keys: list[tuple[bytes, tuple[int, ...]] | None] = [None] * num_pages
        # requests holding pages, and how many of their leading pages are registered
        self._holders: dict[int, Request] = {}
        self._num_registered: dict[int, int] = {}
        # called with (page id, hash) when a cached page is evicted to be reused (its
        # contents are still intact until the plan that reuses it runs): a KV connector
        # spills it to a host tier
        self.on_evict: Callable[[int, bytes], None] | None = None

    # -- queries -----------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        """Pages with no live holder (some may still be prefix-cache hits)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of pages held by live requests."""
        return 1.0 - len(self._free) / self.num_pages

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens."""
        return cdiv(num_tokens, self.page_size)

    def ref_count(self, page_id: int) -> int:
        return self._ref_counts[page_id]

    def holder_ids(self) -> list[int]:
        """Ids of the requests that hold pages."""
        return list(self._holders)

    def get_computed_pages(self, request: Request) -> tuple[list[int], int]:
        """The longest run of cached full pages that starts the request's tokens.

        Never the whole sequence: at least one token is left to compute, so the
        step that schedules it produces logits to sample from. Requests that ask
        for prompt logprobs get no hits (they need logits at every prompt position),
        nor do embeddings pooled over the whole prompt or its first token (mean, cls).

        Returns:
            (page ids, number of tokens they hold). Nothing is reserved: pass the
            pages to ``allocate_slots`` in the same scheduling pass.
        """
        if (not self.enable_prefix_caching or request.sampling.prompt_logprobs is not None
                or request.sampling.pooling in ("mean", "cls")):
            return [], 0
        max_pages = (request.num_tokens - 1) // self.page_size
        hashes = self._page_hashes(request, max_pages)
        tokens = request.all_token_ids
        pages: list[int] = []
        for i in range(max_pages):
            page_id = self._cached_pages.get(hashes[i])
            if page_id is None:
                break
            key = self._page_keys[page_id]
            assert key is not None
            if key[1] != tuple(tokens[i * self.page_size : (i + 1) * self.page_size]):
                break  # a hash collision: treat as a miss
            pages.append(page_id)
        return pages, len(pages) * self.page_size

    # -- allocation --------------------------------------------------------------------------

    def allocate_slots(
        self, request: Request, num_new_tokens: int, new_computed_pages: list[int] | None = None
    ) -> list[int] | None:
        """Give ``request`` pages for ``num_new_tokens`` more tokens.

        Args:
            request: the request; its ``num_computed_tokens`` tokens are already placed.
            num_new_tokens: tokens to compute this step.
            new_computed_pages: prefix-cache hits from ``get_computed_pages`` (on
                admission only); they are referenced and come before the fresh pages.

        Returns:
            The freshly allocated page ids (maybe empty), or None when there are not
            enough free pages; then nothing has changed.
        """
        if not new_computed_pages and request.page_ids:
            # the common decode step: the new tokens fit in the pages the request holds
            if request.num_computed_tokens + num_new_tokens <= len(request.page_ids) * self.page_size:
                return []
        hits = new_computed_pages or []
        num_tokens = request.num_computed_tokens + len(hits) * self.page_size + num_new_tokens
        num_fresh = self.pages_for(num_tokens) - len(request.page_ids) - len(hits)
        # hit pages that sit in the free queue are counted as free but are not ours to take
        num_evictable_hits = sum(1 for p in hits if self._ref_counts[p] == 0)
        if num_fresh > len(self._free) - num_evictable_hits:
            return None
        if not request.page_ids and self.enable_prefix_caching:
            self.stats.queries += request.num_tokens
            self.stats.hits += len(hits) * self.page_size
        for page_id in hits:
            if self._ref_counts[page_id] == 0:
                del self._free[page_id]
            self._ref_counts[page_id] += 1
        fresh = [self._take_free_page() for _ in range(max(num_fresh, 0))]
        request.page_ids.extend(hits)
        request.page_ids.extend(fresh)
        if request.page_ids:
            self._holders[request.req_id] = request
            self._num_registered.setdefault(request.req_id, len(hits))
        return fresh

    def cache_full_pages(self, request: Request) -> None:
        """Register the request's full, computed pages in the prefix cache.

        Call after each step: pages filled by prompt or generated tokens both count.
        A page whose content is already cached under another page id stays
        unregistered (the first copy keeps serving hits).
        """
        if not self.enable_prefix_caching or request.req_id not in self._holders:
            return
        num_computed = min(request.num_computed_tokens, request.num_tokens)
        num_full = min(num_computed // self.page_size, len(request.page_ids))
        start = self._num_registered[request.req_id]
        if num_full <= start:
            return
        hashes = self._page_hashes(request, num_full)
        tokens = request.all_token_ids
        for i in range(start, num_full):
            page_id = request.page_ids[i]
            if self._page_keys[page_id] is not None or hashes[i] in self._cached_pages:
                continue
            page_tokens = tuple(tokens[i * self.page_size : (i + 1) * self.page_size])
            self._page_keys[page_id] = (hashes[i], page_tokens)
            self._cached_pages[hashes[i]] = page_id
        self._num_registered[request.req_id] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's hold on its pages; unheld pages join the free queue.

        Pages go back tail-first, so a request's last pages are evicted before its
        prefix, which is the part most likely to be hit again.
        """
        for page_id in reversed(request.page_ids):
            self._ref_counts[page_id] -= 1
            assert self._ref_counts[page_id] >= 0, f"page {page_id} freed twice"
            if self._ref_counts[page_id] == 0:
                self._free[page_id] = None
        request.page_ids = []
        self._holders.pop(request.req_id, None)
        self._num_registered.pop(request.req_id, None)

    def free_tail(self, request: Request, num_tokens: int) -> int:
        """Give back the request's pages beyond the first ``num_tokens`` tokens.

        Speculative decoding: pages allocated for draft tokens that were rejected. They
        hold no computed token, so they were never registered in the prefix cache.

        Returns:
            How many pages were freed.
        """
        keep = self.pages_for(num_tokens)
        tail = request.page_ids[keep:]
        for page_id in reversed(tail):
            assert self._ref_counts[page_id] == 1 and self._page_keys[page_id] is None, (
                f"page {page_id} beyond the computed tokens is shared or cached")
            self._ref_counts[page_id] = 0
            self._free[page_id] = None
        del request.page_ids[keep:]
        if not request.page_ids:
            self._holders.pop(request.req_id, None)
            self._num_registered.pop(request.req_id, None)
        return len(tail)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (for benchmarks); only when no page is held."""
        if self._holders:
            return False
        self._cached_pages.clear()
        self._page_keys = [None] * self.num_pages
        return True

    # -- internals ---------------------------------------------------------------------------

    def _take_free_page(self) -> int:
        page_id, _ = self._free.popitem(last=False)
        key = self._page_keys[page_id]
        if key is not None:  # evicted from the prefix cache now that it is reused
            if self._cached_pages.get(key[0]) == page_id:
                del self._cached_pages[key[0]]
                if self.on_evict is not None:
                    self.on_evict(page_id, key[0])
            self._page_keys[page_id] = None
        self._ref_counts[page_id] = 1
        return page_id

    def page_hashes(self, request: Request, num_pages: int) -> list[bytes]:
        """The chained hashes of the request's first ``num_pages`` full pages."""
        return self._page_hashes(request, num_pages)[:num_pages]

    def _page_hashes(self, request: Request, num_pages: int) -> list[bytes]:
        """The request's chained page hashes, extended to at least ``num_pages`` pages."""
        hashes = request.page_hashes
        tokens = request.all_token_ids
        size = self.page_size
        while len(hashes) < num_pages:
            i = len(hashes)
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(hash_page(parent, tuple(tokens[i * size : (i + 1) * size])))
        return hashes

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests, debugging)."""
        held = [0] * self.num_pages
        for req_id, request in self._holders.items():
            _check(request.page_ids, f"request {req_id} is a holder without pages")
            _check(
                len(set(request.page_ids)) == len(request.page_ids),
                f"request {req_id} holds a page twice: {request.page_ids}",
            )
            for page_id in request.page_ids:
                held[page_id] += 1
        _check(held == self._ref_counts, "reference counts differ from the holders' pages")
        free = {p for p in range(self.num_pages) if self._ref_counts[p] == 0}
        _check(set(self._free) == free, "free queue is not the set of unheld pages")
        for page_hash, page_id in self._cached_pages.items():
            key = self._page_keys[page_id]
            _check(key is not None and key[0] == page_hash, f"hash map entry of page {page_id}")
        for page_id, key in enumerate(self._page_keys):
            if key is not None:
                _check(
                    self._cached_pages.get(key[0]) == page_id, f"page {page_id} hash not mapped"
                )
                _check(len(key[1]) == self.page_size, f"page {page_id} cached while not full")


def _check(condition: object, message: str) -> None:
    if not condition:
        raise AssertionError(message)

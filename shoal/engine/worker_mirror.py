"""What the workers hold of each request, and the plan deltas that keep it true.

A request travels to the workers in full once (``NewRequestData``, again after a
preemption), then as a row of ``CachedRequests``: only the tokens sampled since the
workers last saw it and its new pages (vLLM V1's new/cached split). The mirror keeps,
per request the workers hold, how many of its tokens and pages they have, and the ids
they must drop with the next plan. Under async scheduling the workers append the
tokens they sample themselves, so the mirror counts those as held already.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.engine.plan import CachedRequests, NewRequestData
from shoal.engine.request import Request


@dataclass(slots=True)
class _WorkerView:
    """What the workers know of a request: how many of its tokens and pages."""

    num_tokens: int
    num_pages: int


class WorkerMirror:
    """The driver's copy of what the workers hold, request by request."""

    def __init__(self) -> None:
        self.views: dict[int, _WorkerView] = {}  # requests the workers hold
        self.pending_finished_ids: list[int] = []  # workers must drop these next plan

    def forget(self, req_id: int) -> None:
        """The request left (finished, preempted): the next plan tells the workers."""
        if self.views.pop(req_id, None) is not None:
            self.pending_finished_ids.append(req_id)

    def take_finished_ids(self) -> list[int]:
        ids, self.pending_finished_ids = self.pending_finished_ids, []
        return ids

    def clear(self) -> None:
        """The workers are gone (a new group holds nothing)."""
        self.views.clear()
        self.pending_finished_ids = []

    def deltas(self, scheduled: Sequence[tuple[Request, int]], in_flight_tokens: dict[int, int],
               in_flight_plans: dict[int, int], pending_samples: dict[int, int],
               spec_drafts: dict[int, list[int]], self_append: bool,
               ) -> tuple[list[NewRequestData], CachedRequests]:
        """The plan's new requests and cached rows for ``scheduled`` (request, tokens).

        Updates the views and the scheduler's in-flight counts (tokens and plans per
        request, and, under ``self_append``, the samples the workers will hold first).
        """
        new_requests = []
        # known requests' deltas go straight into CachedRequests' columns
        c_ids, c_computed, c_ntok, c_tokens, c_npage, c_pages = [], [], [], [], [], []
        c_ndraft, c_drafts = [], []
        views = self.views
        get_view, get_in_flight = views.get, in_flight_tokens.get
        get_plans = in_flight_plans.get
        get_pending = pending_samples.get if self_append else None
        get_drafts = spec_drafts.get if spec_drafts else None
        for request, num_new in scheduled:
            rid = request.req_id
            view = get_view(rid)
            in_flight = get_in_flight(rid, 0)
            placed = request.num_computed_tokens + in_flight  # what the workers will have cached
            pending = get_pending(rid, 0) if get_pending is not None else 0
            all_tokens = request._all_token_ids
            num_tokens = len(all_tokens)
            held = num_tokens + pending  # tokens the workers hold when this plan runs
            drafts = get_drafts(rid, ()) if get_drafts is not None else ()
            pages = request.page_ids
            num_pages = len(pages)
            if view is None:
                assert not in_flight, f"request {rid} is sent in full while in flight"
                assert not drafts, f"request {rid} has drafts in its first plan"
                new_requests.append(
                    NewRequestData(
                        req_id=rid,
                        prompt_token_ids=np.asarray(request.prompt_token_ids, dtype=np.int32),
                        output_token_ids=list(request.output_token_ids),
                        page_ids=list(pages),
                        num_computed_tokens=request.num_computed_tokens,
                        sampling=request.sampling,
                    )
                )
                view = views[rid] = _WorkerView(held, num_pages)
            else:
                known_tokens, known_pages = view.num_tokens, view.num_pages
                c_ids.append(rid)
                c_computed.append(placed)
                if known_tokens < num_tokens:
                    c_ntok.append(num_tokens - known_tokens)
                    c_tokens += all_tokens[known_tokens:]
                else:
                    c_ntok.append(0)
                if known_pages < num_pages:
                    c_npage.append(num_pages - known_pages)
                    c_pages += pages[known_pages:]
                else:
                    c_npage.append(0)
                if get_drafts is not None:
                    c_ndraft.append(len(drafts))
                    c_drafts += drafts
                if held > known_tokens:
                    view.num_tokens = held
                view.num_pages = num_pages
            if (get_pending is not None and placed + num_new - len(drafts) == held
                    and not request.sampling.pooling):
                view.num_tokens += 1  # the workers append the token they sample
                pending_samples[rid] = pending + 1
            in_flight_tokens[rid] = in_flight + num_new
            in_flight_plans[rid] = get_plans(rid, 0) + 1
        rows = len(c_ids)
        return new_requests, CachedRequests(
            req_ids=np.asarray(c_ids, dtype=np.int64),
            num_computed_tokens=np.asarray(c_computed, dtype=np.int64),
            new_token_counts=np.asarray(c_ntok, dtype=np.int32),
            new_token_ids=np.asarray(c_tokens, dtype=np.int32),
            new_page_counts=np.asarray(c_npage, dtype=np.int32),
            new_page_ids=np.asarray(c_pages, dtype=np.int32),
            draft_counts=(np.asarray(c_ndraft, dtype=np.int32) if get_drafts is not None
                          else np.zeros(rows, np.int32)),
            draft_token_ids=np.asarray(c_drafts, dtype=np.int32),
        )

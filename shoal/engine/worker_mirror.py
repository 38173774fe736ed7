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


@dataclass
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
        for request, num_new in scheduled:
            rid = request.req_id
            view = views.get(rid)
            in_flight = in_flight_tokens.get(rid, 0)
            placed = request.num_computed_tokens + in_flight  # what the workers will have cached
            pending = pending_samples.get(rid, 0) if self_append else 0
            all_tokens = request._all_token_ids
            held = len(all_tokens) + pending  # tokens the workers hold when this plan runs
            drafts = spec_drafts.get(rid, ()) if spec_drafts else ()
            samples = placed + num_new - len(drafts) == held
            pages = request.page_ids
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
                view = views[rid] = _WorkerView(held, len(pages))
            else:
                known_tokens, known_pages = view.num_tokens, view.num_pages
                c_ids.append(rid)
                c_computed.append(placed)
                if known_tokens < len(all_tokens):
                    c_ntok.append(len(all_tokens) - known_tokens)
                    c_tokens += all_tokens[known_tokens:]
                else:
                    c_ntok.append(0)
                if known_pages < len(pages):
                    c_npage.append(len(pages) - known_pages)
                    c_pages += pages[known_pages:]
                else:
                    c_npage.append(0)
                c_ndraft.append(len(drafts))
                if drafts:
                    c_drafts += drafts
                if held > known_tokens:
                    view.num_tokens = held
                view.num_pages = len(pages)
            if samples and self_append and not request.sampling.pooling:
                view.num_tokens += 1  # the workers append the token they sample
                pending_samples[rid] = pending + 1
            in_flight_tokens[rid] = in_flight + num_new
            in_flight_plans[rid] = in_flight_plans.get(rid, 0) + 1
        return new_requests, CachedRequests(
            req_ids=np.asarray(c_ids, dtype=np.int64),
            num_computed_tokens=np.asarray(c_computed, dtype=np.int64),
            new_token_counts=np.asarray(c_ntok, dtype=np.int32),
            new_token_ids=np.asarray(c_tokens, dtype=np.int32),
            new_page_counts=np.asarray(c_npage, dtype=np.int32),
            new_page_ids=np.asarray(c_pages, dtype=np.int32),
            draft_counts=np.asarray(c_ndraft, dtype=np.int32),
            draft_token_ids=np.asarray(c_drafts, dtype=np.int32),
        )

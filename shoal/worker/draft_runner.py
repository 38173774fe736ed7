"""The draft model of draft-model speculation, on the output rank.

After each step the output rank runs a small model over every request that sampled
and proposes its next ``k`` tokens greedily; the proposals travel back in the
StepResult and the driver puts them in the request's next plan, where the target
verifies them (``shoal.worker.rejection_sampler``). A proposal is only a guess:
whatever it holds, verification keeps the output exactly the target's.

- **Placement**: the draft is replicated, whole, on the output rank only (a tp1
  model over a one-process ParallelContext: no collectives), whatever the target's
  layout; drafts are meant to be small.
- **KV cache**: its own paged cache with the target's page ids (a request's page
  table serves both), from the same budget: ``bytes_per_page`` is added to the
  output rank's page size when the driver sizes the cache. Draft positions past
  the pages the target holds go to a few scratch pages per request slot.
- **Catch-up**: ``computed[slot]`` counts the tokens whose draft KV is written; each
  proposal first runs the tokens since then (the prompt after admission, then the
  step's accepted tokens and its new one) as one chunk, then ``k - 1`` single-token
  steps. KV written for draft positions is rewritten by the next catch-up.
- ``draft_layers`` keeps only the checkpoint's first N decoder layers with its own
  final norm and head: a self-draft of the target without a second checkpoint.
"""
from __future__ import annotations

import logging
import re

import numpy as np
import torch
from transformers import AutoConfig

from shoal.engine.control import LoadModel
from shoal.models.attention import AttentionMetadata
from shoal.models.ops.build import kernels_enabled
from shoal.models.registry import build_model
from shoal.parallel.context import ParallelContext
from shoal.parallel.linear import prepack_weights
from shoal.worker.request_table import RequestTable

logger = logging.getLogger(__name__)


_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def _renumbered(resolve, keep: list[int]):
    """A weight-name resolver that loads checkpoint layer ``keep[j]`` as draft layer j."""
    index = {layer: j for j, layer in enumerate(keep)}

    def resolve_kept(name: str):
        match = _LAYER_NAME.match(name)
        if match:
            j = index.get(int(match.group(1)))
            if j is None:
                return None
            name = f"model.layers.{j}.{match.group(2)}"
        return resolve(name)
    return resolve_kept


class DraftProposer:
    """A draft model with its own KV pages that proposes ``k`` tokens per request."""

    def __init__(self, args: LoadModel, device: torch.device, dtype: torch.dtype):
        self.k = int(args.num_speculative_tokens)
        self.device = device
        config = AutoConfig.from_pretrained(args.draft_model)
        keep = list(args.draft_layers)
        if keep:
            config.num_hidden_layers = len(keep)
            if isinstance(getattr(config, "layer_types", None), list):
                config.layer_types = [config.layer_types[i] for i in keep]
        with torch.device(device):
            self.model = build_model(config, ParallelContext.single(device), dtype)
        if keep:
            self.model.resolve_weight_name = _renumbered(self.model.resolve_weight_name, keep)
        self.model.load_weights(args.draft_model)
        self.model.eval()
        if kernels_enabled():
            prepack_weights(self.model, dtype, device)
        self.max_slots = int(args.max_num_seqs)
        self.computed = np.zeros(64, np.int64)  # per table slot: tokens with draft KV
        self.page_size = self.num_pages = self.scratch_per_slot = 0
        logger.info("draft model %s (%d layers) proposes %d tokens", args.draft_model,
                    config.num_hidden_layers, self.k)

    def bytes_per_page(self, page_size: int) -> int:
        return self.model.kv_cache_spec.bytes_per_page(page_size)

    def init_kv_cache(self, num_pages: int, page_size: int) -> None:
        """The target's page ids, then ``scratch_per_slot`` pages for each request slot."""
        self.page_size, self.num_pages = page_size, num_pages
        # a proposal writes at most k positions past the pages the target holds
        self.scratch_per_slot = -(-self.k // page_size) + 1
        total = num_pages + self.max_slots * self.scratch_per_slot
        self.model.bind_kv_cache(self.model.kv_cache_spec.allocate(total, page_size, self.device))

    def reset(self, slot: int) -> None:
        """A request (re)admitted into ``slot``: its draft KV is written from the start."""
        if slot >= len(self.computed):
            self.computed = np.concatenate(
                [self.computed, np.zeros(max(slot + 1, 2 * len(self.computed)), np.int64)])
        self.computed[slot] = 0

    @torch.inference_mode()
    def propose(self, table: RequestTable, slots: np.ndarray,
                emitted: list[list[int]]) -> list[list[int]]:
        """Drafts to follow each request's tokens plus the ``emitted`` ones of this step.

        ``emitted[i]``: the tokens request ``slots[i]`` got this step, not yet in the
        table. Requests whose slot has no scratch pages get no drafts ([]).
        """
        rows = [i for i, slot in enumerate(slots.tolist()) if slot < self.max_slots]
        drafts: list[list[int]] = [[] for _ in emitted]
        if not rows:
            return drafts
        slots = slots[rows]
        done = self.computed[slots]
        chunks = []
        for i, slot, start in zip(rows, slots.tolist(), done.tolist()):
            held = int(table.num_tokens[slot])
            chunks.append(table.tokens[slot, start:held].tolist() + emitted[i])
        lengths = np.asarray([len(c) for c in chunks], np.int64)
        ends = done + lengths  # the sequence lengths the proposals follow
        tables = self._tables(table, slots, ends + self.k - 1)
        ids = np.concatenate([np.asarray(c, np.int64) for c in chunks])
        last_rows = np.cumsum(lengths) - 1
        tokens = self._step(ids, lengths, done, tables, last_rows)
        self.computed[slots] = ends
        proposed = [tokens]
        ones = np.ones(len(rows), np.int64)
        for j in range(1, self.k):  # each draft token in turn, all requests at once
            tokens = self._step(tokens, ones, ends + j - 1, tables, np.arange(len(rows)))
            proposed.append(tokens)
        columns = np.stack(proposed, axis=1).tolist()  # [requests, k]
        for i, row in zip(rows, columns):
            drafts[i] = row
        return drafts

    def _step(self, ids: np.ndarray, lengths: np.ndarray, computed: np.ndarray,
              tables: np.ndarray, last_rows: np.ndarray) -> np.ndarray:
        """One draft forward; the greedy next token after each request's last row."""
        meta = AttentionMetadata.from_arrays(lengths, computed, tables, self.page_size,
                                             self.device)
        hidden = self.model(torch.from_numpy(ids).to(self.device), meta.positions, meta, None)
        rows = torch.from_numpy(last_rows).to(self.device)
        logits = self.model.compute_logits(hidden[rows])  # [B, vocab]
        return logits.float().argmax(-1).to("cpu", torch.int64).numpy()

    def _tables(self, table: RequestTable, slots: np.ndarray,
                positions: np.ndarray) -> np.ndarray:
        """Page rows covering ``positions[i]`` positions of each request: the target's
        pages, then the slot's scratch pages (page 0 past what a row needs)."""
        need = -(-positions[:, None] // self.page_size)  # [B, 1]
        columns = int(need.max())
        own = table.num_pages[slots][:, None]  # [B, 1]
        col = np.arange(columns)[None, :]  # [1, C]
        width = min(columns, table.pages.shape[1])
        pages = np.zeros((len(slots), columns), np.int64)
        pages[:, :width] = table.pages[slots, :width]
        scratch = self.num_pages + slots[:, None] * self.scratch_per_slot + (col - own)
        past = (col >= own) & (col < need)
        if (past & (col - own >= self.scratch_per_slot)).any():
            raise RuntimeError("a draft proposal runs past its scratch pages")
        return np.where(past, scratch, np.where(col < need, pages, 0))

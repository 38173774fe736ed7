"""Token sampling on the output rank: penalties, temperature, min-p, top-k, top-p.

The order follows vLLM V1's sampler (vllm/v1/sample/sampler.py):

1. logprobs of the raw model distribution (``log_softmax`` of the logits as they
   come from the model), if any request asked for them;
2. ``min_tokens``: EOS and stop token ids get ``-inf`` while a request is short;
3. penalties, HF semantics: repetition over prompt + output tokens (positive
   logits divided, negative multiplied), then frequency (per occurrence) and
   presence (once) over output tokens only;
4. greedy rows (temperature ~ 0) take ``argmax`` of those logits (first max index);
5. the other rows: divide by temperature, drop tokens below ``min_p`` times the
   top probability, keep the ``top_k`` best, then the smallest top set holding
   ``top_p`` of the mass (renormalised over the top-k set), and sample.

Sampling is inverse-CDF with one uniform number per row (what
``torch.multinomial`` does for one sample): ``cumsum`` of the kept weights and a
``searchsorted``. We chose it over the exponential race
(``argmax(probs / Exponential(1))``) because it needs one random number per row
instead of one per vocabulary entry: on two CPU cores, drawing 64 x 49,152
exponentials takes about 90 ms, the cumsum about 2 ms. A token whose weight is 0
(filtered) is never chosen: the uniform is kept strictly below the total.

Rows with top-k or top-p sample among their best candidates only
(``torch.topk``; for top-p alone 64 at first, 8 times more while the top-p cut is
not among them), so they need no full sort unless the distribution is flat.
Top-k keeps exactly k tokens (ties at the k-th value broken by ``topk``'s order).
Weights are computed without boolean masks (slow on CPU): see :func:`weights_`.
Tokens less likely than ``e**-60`` times the best get weight 0: float32 sampling
could not draw them anyway.

Seeds: a seeded row's uniform is a hash of (seed, number of output tokens so far),
so its draw depends only on its own logits row and history: the same in any batch,
and the same after preemption and recompute. Unseeded rows share one
``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from shoal.engine.plan import SAMPLING_EPS, SamplingOptions
from shoal.models.ops import fused
from shoal.worker.structured_output import RequestGrammar, apply_grammars

_MASK64 = (1 << 64) - 1
_TOP_P_FIRST_CANDIDATES = 64  # top-p looks at this many best tokens first, then 8x more
# min-p cut in log space, relative to the best token: tokens e**60 times less likely than
# the best are never drawn (float32 sampling resolves 2**-24), and the best is always kept
_CUTOFF_FLOOR = -60.0
_CUTOFF_CEIL = -1e-5


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def seeded_uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step).

    24 bits, so it is exact in float32 and strictly below 1.
    """
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ step) >> 40) / float(1 << 24)


@dataclass(eq=False)
class SamplingState:
    """One request as the sampler sees it, kept on the output rank between steps.

    Append sampled tokens with :meth:`append_output` (or to ``output_token_ids``
    directly): the penalty bookkeeping catches up with any tokens appended since
    the last step, in O(new tokens).
    """

    options: SamplingOptions
    prompt_token_ids: Sequence[int] | np.ndarray
    output_token_ids: list[int] = field(default_factory=list)
    # the request's grammar matcher (structured output), advanced by every appended token
    grammar: RequestGrammar | None = None
    # penalty bookkeeping: distinct output ids in first-seen order and their counts
    _prompt_ids: np.ndarray | None = field(default=None, init=False, repr=False)
    _out_ids: np.ndarray = field(
        default_factory=lambda: np.zeros(16, np.int64), init=False, repr=False
    )
    _out_counts: np.ndarray = field(
        default_factory=lambda: np.zeros(16, np.float32), init=False, repr=False
    )
    _out_slot: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    _num_counted: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.output_token_ids = list(self.output_token_ids)
        if self.grammar is not None:  # a resumed request: replay what it generated
            for token in self.output_token_ids:
                self.grammar.accept(token)

    @property
    def tracks_output(self) -> bool:
        """True when sampling reads the output so far (seeded draws count it, penalties,
        bad words, min_tokens and grammars read it). The runner appends tokens only to
        such states: the others' ``output_token_ids`` is never read, and not kept."""
        o = self.options
        return (o.seed is not None or self.has_penalties or bool(o.bad_words_ids)
                or o.min_tokens > 0 or self.grammar is not None)

    @property
    def is_greedy(self) -> bool:
        return self.options.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        o = self.options
        return (
            o.presence_penalty != 0.0 or o.frequency_penalty != 0.0 or o.repetition_penalty != 1.0
        )

    @property
    def min_tokens_active(self) -> bool:
        """True while the stop token ids must be masked (too few outputs yet)."""
        o = self.options
        return (o.min_tokens > 0 and bool(o.stop_token_ids)
                and len(self.output_token_ids) < o.min_tokens)

    @property
    def has_logits_processors(self) -> bool:
        """True when logit_bias, allowed_token_ids, bad_words or a grammar applies."""
        o = self.options
        return bool(o.logit_bias_ids or o.allowed_token_ids or o.bad_words_ids
                    or self.grammar is not None)

    def append_output(self, token_ids: Iterable[int]) -> None:
        new = [int(t) for t in token_ids]
        self.output_token_ids.extend(new)
        if self.grammar is not None:
            for token in new:
                self.grammar.accept(token)

    def banned_by_bad_words(self) -> list[int]:
        """Last tokens of bad words whose other tokens end the output (vLLM's rule)."""
        out = self.output_token_ids
        banned = []
        for word in self.options.bad_words_ids:
            prefix = word[:-1]
            if not prefix or (len(out) >= len(prefix) and out[len(out) - len(prefix):] == prefix):
                banned.append(word[-1])
        return banned

    def prompt_ids(self) -> np.ndarray:
        """Distinct prompt token ids, int64 [P]; cached."""
        if self._prompt_ids is None:
            self._prompt_ids = np.unique(np.asarray(self.prompt_token_ids, dtype=np.int64))
        return self._prompt_ids

    def output_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct output token ids int64 [U] and their counts float32 [U]."""
        n = len(self.output_token_ids)
        if self._num_counted > n:  # the list was replaced by a shorter one: start over
            self._out_slot.clear()
            self._num_counted = 0
        for token in self.output_token_ids[self._num_counted :]:
            slot = self._out_slot.get(token)
            if slot is None:
                slot = self._out_slot[token] = len(self._out_slot)
                if slot == len(self._out_ids):  # grow by doubling
                    self._out_ids = np.concatenate([self._out_ids, np.zeros_like(self._out_ids)])
                    self._out_counts = np.concatenate(
                        [self._out_counts, np.zeros_like(self._out_counts)]
                    )
                self._out_ids[slot] = token
                self._out_counts[slot] = 0.0
            self._out_counts[slot] += 1.0
        self._num_counted = n
        num_distinct = len(self._out_slot)
        # views of the bookkeeping arrays: valid until the next call
        return self._out_ids[:num_distinct], self._out_counts[:num_distinct]


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Row argmax of float32 [N, V]: the fused CPU kernel where it runs, else torch's."""
    return fused.argmax_rows(x) if fused.fused_ops_on(x) else x.argmax(-1)


@dataclass
class SamplerOutput:
    """Sampled tokens of one step, one row per request, in batch order.

    ``logprobs``/``top_*`` are of the raw model distribution; they are None when
    no request of the batch asked for logprobs (``top_*`` also when all asked 0).
    ``k`` is the most top logprobs any request of the batch asked for; rows that
    asked for fewer take the first ones (sorted best first).
    """

    token_ids: torch.Tensor  # int64 [N]
    logprobs: torch.Tensor | None = None  # float32 [N]
    top_token_ids: torch.Tensor | None = None  # int64 [N, k]
    top_logprobs: torch.Tensor | None = None  # float32 [N, k]


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Logprobs of chosen tokens and the ``k`` best, from ``log_softmax`` output.

    Also serves prompt logprobs (``token_ids`` = the next prompt token per position).

    Args:
        logprobs: float32 [T, V].
        token_ids: int64 [T].
        k: number of top entries; 0 = none.
    Returns:
        (chosen [T], top ids [T, k] or None, top logprobs [T, k] or None)
    """
    chosen = logprobs.gather(1, token_ids.view(-1, 1)).squeeze(1)  # [T]
    if k <= 0:
        return chosen, None, None
    top_lps, top_ids = logprobs.topk(min(k, logprobs.shape[1]), dim=-1)  # [T, k]
    return chosen, top_ids, top_lps


def apply_penalties(
    logits: torch.Tensor, rows: Sequence[int], states: Sequence[SamplingState]
) -> None:
    """Repetition, then frequency and presence penalties, in place on ``logits`` [N, V].

    Sparse: only the logits of tokens that occur are read and written, so the cost
    is the number of distinct prompt and output tokens, not rows x vocabulary.
    ``states[j]`` is the request of row ``rows[j]``.
    """
    vocab = logits.shape[1]
    flat = logits.view(-1)  # [N * V]
    # per penalised row: token ids (repeats are fine: the writes are idempotent), the row
    rep_ids: list[np.ndarray] = []
    rep_rows: list[tuple[int, float]] = []  # (row, penalty)
    add_ids: list[np.ndarray] = []
    add_vals: list[np.ndarray] = []
    add_rows: list[int] = []
    for row, state in zip(rows, states):
        o = state.options
        out_ids, out_counts = state.output_counts()  # [U], [U]
        if o.repetition_penalty != 1.0:
            rep_ids.append(np.concatenate([state.prompt_ids(), out_ids]))
            rep_rows.append((row, o.repetition_penalty))
        if (o.frequency_penalty != 0.0 or o.presence_penalty != 0.0) and len(out_ids):
            add_ids.append(out_ids)
            add_vals.append(out_counts * np.float32(-o.frequency_penalty) - o.presence_penalty)
            add_rows.append(row)
    if rep_ids:
        index, keep = _flat_index(rep_ids, [r for r, _ in rep_rows], vocab)
        lengths = [len(ids) for ids in rep_ids]
        penalty = np.repeat(np.array([p for _, p in rep_rows], np.float32), lengths)[keep]
        index_t = torch.from_numpy(index).to(logits.device)
        penalty_t = torch.from_numpy(penalty).to(logits.device)
        x = flat[index_t]
        flat[index_t] = torch.where(x > 0, x / penalty_t, x * penalty_t)
    if add_ids:
        index, keep = _flat_index(add_ids, add_rows, vocab)
        values = np.concatenate(add_vals).astype(np.float32)[keep]
        flat.index_add_(
            0, torch.from_numpy(index).to(logits.device), torch.from_numpy(values).to(logits.device)
        )


def apply_logits_processors(
    logits: torch.Tensor, rows: Sequence[int], states: Sequence[SamplingState]
) -> None:
    """allowed_token_ids, bad_words, logit_bias, then grammar bitmasks, in place on [N, V].

    Only the listed rows change, so free requests of a batch keep their logits bit for bit.
    """
    vocab = logits.shape[1]
    device = logits.device
    grammar_rows, grammars = [], []
    for row, state in zip(rows, states):
        o = state.options
        if o.allowed_token_ids:
            keep = torch.tensor([t for t in o.allowed_token_ids if t < vocab], dtype=torch.int64,
                                device=device)
            kept = logits[row, keep].clone()
            logits[row].fill_(float("-inf"))
            logits[row, keep] = kept
        if o.bad_words_ids:
            banned = [t for t in state.banned_by_bad_words() if t < vocab]
            if banned:
                logits[row, torch.tensor(banned, dtype=torch.int64, device=device)] = float("-inf")
        if o.logit_bias_ids:
            ids = torch.tensor(o.logit_bias_ids, dtype=torch.int64, device=device)
            values = torch.tensor(o.logit_bias_values, dtype=logits.dtype, device=device)
            logits[row].index_add_(0, ids, values)
        if state.grammar is not None:
            grammar_rows.append(row)
            grammars.append(state.grammar)
    if grammars:
        apply_grammars(logits, grammar_rows, grammars)


def _flat_index(
    ids: list[np.ndarray], rows: list[int], vocab: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``row * vocab + id`` in flattened logits, and which ids are < vocab.

    Ids the logits do not cover (an embedding larger than the lm head) are skipped, as HF does.
    """
    flat_ids = np.concatenate(ids)
    keep = flat_ids < vocab
    base = np.repeat(np.asarray(rows, np.int64) * vocab, [len(x) for x in ids])
    return (flat_ids + base)[keep], keep


def sample_from_weights(
    weights: torch.Tensor, uniforms: torch.Tensor, cdf_out: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse-CDF sampling: row i picks j with probability weights[i, j] / sum(weights[i]).

    Args:
        weights: non-negative float32 [M, K], each row with a positive entry.
        uniforms: float32 [M] in [0, 1).
        cdf_out: optional float32 [M, K] buffer for the cumulative sums.
    Returns:
        int64 [M]; never an index whose weight is 0.
    """
    cdf = torch.cumsum(weights, -1, out=cdf_out)  # [M, K], non-decreasing
    total = cdf[:, -1:]  # [M, 1]
    x = torch.minimum(uniforms.unsqueeze(1) * total, total.nextafter(torch.zeros_like(total)))
    # first j with cdf[j] > x: then cdf[j] > x >= cdf[j-1], so weights[j] > 0
    idx = torch.searchsorted(cdf, x, right=True).squeeze(1)  # [M]
    return idx.clamp_(max=weights.shape[1] - 1)


def weights_(scaled: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """In place: ``exp(scaled - cutoff)`` where ``scaled > cutoff``, else 0.

    Args:
        scaled: float32 [M, K], temperature-scaled logits, each row's max at 0.
        cutoff: float32 [M, 1] in [-60, -1e-5]: the min-p cut ``log(min_p)``.
    Returns:
        ``scaled``, now unnormalised probabilities relative to ``e**cutoff`` (the best
        token weighs at most e**60, so sums stay finite), with the dropped tokens at 0.
        Without a comparison mask: tokens at or below the cutoff end up at most
        ``exp(0) = 1`` and ``threshold_`` zeroes them; the clamp keeps ``exp`` off the
        CPU's slow path for underflowing results.
    """
    scaled.sub_(cutoff).clamp_(min=-1.0).exp_()
    return F.threshold_(scaled, 1.0, 0.0)


def sample_top_k_top_p(
    scaled: torch.Tensor,
    cutoff: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniforms: torch.Tensor,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample rows filtered by min-p (``cutoff``), then top-k, then top-p.

    Args:
        scaled: float32 [M, V], temperature-scaled logits, each row's max at 0 (kept intact).
        cutoff: float32 [M, 1], see :func:`weights_`.
        top_k: int64 [M], ``V`` where top-k is off.
        top_p: float32 [M], 1.0 where top-p is off.
        uniforms: float32 [M] in [0, 1).
        scratch: optional float32 buffer of at least M x V elements.
    Returns:
        token ids, int64 [M].

    Top-p keeps the best tokens while the mass before them is below ``top_p`` of the
    mass that min-p and top-k left (HF's ``TopPLogitsWarper``: drop while the
    ascending cumulative mass is <= 1 - p).
    """
    num_rows, vocab = scaled.shape
    device = scaled.device
    token_ids = torch.empty(num_rows, dtype=torch.int64, device=device)
    has_k = top_k < vocab  # [M]
    total = torch.ones(num_rows, device=device)  # [M], mass left by min-p, rows without top-k
    if not bool(has_k.all()):
        rows = (~has_k).nonzero().squeeze(1)
        out = None if scratch is None else scratch[: len(rows) * vocab].view(len(rows), vocab)
        total[rows] = weights_(torch.index_select(scaled, 0, rows, out=out), cutoff[rows]).sum(-1)
    pending = torch.arange(num_rows, device=device)
    k_max = int(top_k[has_k].max()) if bool(has_k.any()) else 0
    num_candidates = max(k_max, _TOP_P_FIRST_CANDIDATES)
    while len(pending):
        k0 = min(num_candidates, vocab)
        rows_left = scaled if len(pending) == num_rows else scaled[pending]
        vals, ids = rows_left.topk(k0, dim=-1)  # [R, k0], best first
        in_k = torch.arange(k0, device=device).unsqueeze(0) < top_k[pending].unsqueeze(1)
        w = weights_(vals, cutoff[pending]) * in_k  # [R, k0]
        cum = w.cumsum(-1)  # [R, k0]
        row_has_k, row_p = has_k[pending], top_p[pending]
        mass = torch.where(row_has_k, cum[:, -1], total[pending]) * row_p  # [R]
        done = row_has_k | (cum[:, -1] >= mass) | (k0 == vocab)  # the cut lies inside
        keep = (cum - w < mass.unsqueeze(1)) | (row_p >= 1.0).unsqueeze(1)  # [R, k0]
        keep[:, 0] = True
        rows = done.nonzero().squeeze(1)
        pick = sample_from_weights((w * keep)[rows], uniforms[pending[rows]])  # [D]
        token_ids[pending[rows]] = ids[rows].gather(1, pick.unsqueeze(1)).squeeze(1)
        pending = pending[~done]
        num_candidates *= 8
    return token_ids


class Sampler:
    """Picks one token per row of a step's logits (see the module docstring).

    Args:
        seed: seed of the generator shared by unseeded requests (None: random).
    """

    def __init__(self, seed: int | None = None):
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)
        # [N, V] float32 work buffers kept between steps: a fresh 12 MB tensor per step
        # costs page faults that take longer than the arithmetic
        self._buffers: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _buffer(self, slot: int, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        buf = self._buffers.get((slot, device))
        if buf is None or buf.numel() < rows * vocab:
            buf = torch.empty(rows * vocab, device=device)
            self._buffers[(slot, device)] = buf
        return buf[: rows * vocab].view(rows, vocab)

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        """Sample one token per row.

        Args:
            logits: [N, V], row i for ``states[i]`` (converted to float32; not modified).
            states: the requests, in batch order.
        """
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits must be [num_requests={len(states)}, vocab], got {tuple(logits.shape)}"
            )
        logits = logits.float()
        asked = [s.options.logprobs for s in states if s.options.logprobs is not None]
        raw_logprobs = logits.log_softmax(-1) if asked else None  # [N, V]

        processed = self._process(logits, states)  # [N, V]
        greedy = [s.is_greedy for s in states]
        if all(greedy):
            token_ids = _argmax(processed)  # [N]
        elif not any(greedy):
            token_ids = self._sample_random(processed, states)
        else:
            device = logits.device
            token_ids = torch.empty(len(states), dtype=torch.int64, device=device)
            rows = torch.tensor([i for i, g in enumerate(greedy) if g], device=device)
            token_ids[rows] = _argmax(processed[rows])
            random_rows = [i for i, g in enumerate(greedy) if not g]
            rows = torch.tensor(random_rows, device=device)
            out = self._buffer(1, len(random_rows), logits.shape[1], device)
            token_ids[rows] = self._sample_random(
                torch.index_select(processed, 0, rows, out=out), [states[i] for i in random_rows]
            )

        if raw_logprobs is None:
            return SamplerOutput(token_ids=token_ids)
        chosen, top_ids, top_lps = gather_logprobs(raw_logprobs, token_ids, max(asked))
        return SamplerOutput(token_ids, chosen, top_ids, top_lps)

    def processed(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """``logits`` [N, V] after min_tokens, logits processors and penalties (a new tensor)."""
        return self._process(logits.float(), states).clone()

    @property
    def generator(self) -> torch.Generator:
        """The generator unseeded requests draw from."""
        return self._generator

    def _process(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """min_tokens masking and penalties; a new tensor only if something applies."""
        short = [i for i, s in enumerate(states) if s.min_tokens_active]
        penalised = [i for i, s in enumerate(states) if s.has_penalties]
        processed = [i for i, s in enumerate(states) if s.has_logits_processors]
        if not short and not penalised and not processed:
            return logits
        logits = self._buffer(3, *logits.shape, logits.device).copy_(logits)
        vocab = logits.shape[1]
        if processed:
            apply_logits_processors(logits, processed, [states[i] for i in processed])
        for i in short:
            ids = [t for t in states[i].options.stop_token_ids if t < vocab]
            logits[i, torch.tensor(ids, dtype=torch.int64, device=logits.device)] = float("-inf")
        if penalised:
            apply_penalties(logits, penalised, [states[i] for i in penalised])
        return logits

    def _uniforms(self, states: Sequence[SamplingState], device: torch.device) -> torch.Tensor:
        """One uniform per row: seeded rows from (seed, outputs so far), the rest shared."""
        u = torch.rand(len(states), generator=self._generator)  # [M]
        for i, s in enumerate(states):
            if s.options.seed is not None:
                u[i] = seeded_uniform(s.options.seed, len(s.output_token_ids))
        return u.to(device)

    def _sample_random(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """Temperature, min-p, top-k, top-p, then a draw; logits [M, V] -> ids [M]."""
        num_rows, vocab = logits.shape
        device = logits.device
        opts = [s.options for s in states]
        temps = torch.tensor([o.temperature for o in opts], device=device).unsqueeze(1)  # [M, 1]
        # (logits - max) / t: each row's best token sits at exactly 0
        scaled = torch.sub(
            logits, logits.amax(-1, keepdim=True), out=self._buffer(0, *logits.shape, device)
        )
        scaled.div_(temps)  # [M, V]
        # min-p: p_i < min_p * p_max  <=>  scaled_i < log(min_p)
        cutoff = torch.tensor(
            [
                min(max(math.log(o.min_p), _CUTOFF_FLOOR), _CUTOFF_CEIL)
                if o.min_p > 0
                else _CUTOFF_FLOOR
                for o in opts
            ],
            device=device,
        ).unsqueeze(1)  # [M, 1]
        uniforms = self._uniforms(states, device)  # [M]
        cut = [i for i, o in enumerate(opts) if 0 < o.top_k < vocab or o.top_p < 1.0]
        if not cut:
            cdf = self._buffer(2, num_rows, vocab, device)
            return sample_from_weights(weights_(scaled, cutoff), uniforms, cdf_out=cdf)
        top_k = torch.tensor([o.top_k if 0 < o.top_k < vocab else vocab for o in opts])
        top_p = torch.tensor([o.top_p for o in opts])
        scratch = self._buffer(2, num_rows, vocab, device).view(-1)
        if len(cut) == len(opts):
            return sample_top_k_top_p(
                scaled, cutoff, top_k.to(device), top_p.to(device), uniforms, scratch
            )
        token_ids = torch.empty(num_rows, dtype=torch.int64, device=device)
        rows = torch.tensor(cut, device=device)
        token_ids[rows] = sample_top_k_top_p(
            scaled[rows],
            cutoff[rows],
            top_k[cut].to(device),
            top_p[cut].to(device),
            uniforms[rows],
            scratch,
        )
        cut_set = set(cut)
        plain = torch.tensor([i for i in range(num_rows) if i not in cut_set], device=device)
        token_ids[plain] = sample_from_weights(
            weights_(scaled[plain], cutoff[plain]), uniforms[plain]
        )
        return token_ids

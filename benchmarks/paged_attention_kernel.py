"""Microseconds per call of the CPU paged-attention kernel against a baseline, one run.

The baseline is the kernel source at a git ref (default ``main``), built under another
op namespace (``shoal_baseline``) in ``$SHOAL_CACHE_DIR/kernels``, so the current and the
previous kernel run in one process, interleaved, and background load hits both alike.
``--reference`` adds the gather + masked-softmax torch reference (slow: a Python loop).

Cases (SmolLM2-135M's attention: 9 query heads, 3 kv heads, head_dim 64):
* decode: ``batch`` sequences of one new token over ``context`` cached tokens
  (``ragged``: contexts drawn from U(100, 800));
* prefill: one chunk of ``chunk`` new tokens after ``context - chunk`` cached ones.

    python benchmarks/paged_attention_kernel.py [--dtypes bfloat16 float32] [--reps 7]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import time
from pathlib import Path

import torch
from common import emit
from torch.utils import cpp_extension

from shoal.models.ops import paged_attention as pa
from shoal.models.ops.build import CFLAGS, LDFLAGS, cache_root

HQ, HKV, DIM = 9, 3, 64
SOURCE = "shoal/models/ops/csrc/paged_attention.cpp"


def load_baseline(ref: str):
    """Build the kernel at ``ref`` as ``torch.ops.shoal_baseline.paged_attention``."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "show", f"{ref}:{SOURCE}"], cwd=root, check=True,
                          capture_output=True, text=True).stdout
    text = text.replace("TORCH_LIBRARY_FRAGMENT(shoal,", "TORCH_LIBRARY_FRAGMENT(shoal_baseline,")
    text = text.replace("TORCH_LIBRARY_IMPL(shoal,", "TORCH_LIBRARY_IMPL(shoal_baseline,")
    tag = hashlib.sha256((text + torch.__version__).encode()).hexdigest()[:16]
    build_dir = cache_root() / "kernels" / f"baseline-{tag}"
    build_dir.mkdir(parents=True, exist_ok=True)
    src = build_dir / "paged_attention_baseline.cpp"
    src.write_text(text)
    built = build_dir / f"shoal_pa_baseline_{tag}.so"
    if built.exists():
        torch.ops.load_library(str(built))
    else:
        cpp_extension.load(name=f"shoal_pa_baseline_{tag}", sources=[str(src)],
                           extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                           build_directory=str(build_dir), is_python_module=False)
    return torch.ops.shoal_baseline.paged_attention


def make_batch(query_lens, contexts, page_size, dtype, seed=0):
    """q [T, HQ, DIM] and a paged cache holding every context on shuffled pages."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // page_size) for c in contexts]
    num_pages = sum(need) + 1
    perm = torch.randperm(num_pages, generator=gen).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at : at + n])
        at += n
    width = max(need)
    table = torch.tensor([t + [perm[-1]] * (width - len(t)) for t in tables])  # [B, width]
    cache = torch.randn(2, num_pages, page_size, HKV, DIM, generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), HQ, DIM, generator=gen).to(dtype)
    starts = torch.tensor([0] + list(query_lens)).cumsum(0)
    return q, cache[0], cache[1], table, starts, torch.tensor(contexts)


def cases(ragged_seed=1):
    gen = torch.Generator().manual_seed(ragged_seed)
    for batch in (1, 4, 32):
        for context in (128, 512):
            yield "decode", batch, [1] * batch, [context] * batch, str(context)
    ragged = torch.randint(100, 801, (32,), generator=gen).tolist()
    yield "decode", 32, [1] * 32, ragged, "U(100,800)"
    for chunk, context in ((128, 128), (256, 512)):
        yield "prefill", 1, [chunk], [context], str(context)


def time_interleaved(fns: dict, reps: int, inner: int) -> dict:
    """Median microseconds per call of each function, timed in turns."""
    samples = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm up
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner * 1e6)
    medians = {name: statistics.median(s) for name, s in samples.items()}
    return medians, {name.replace("_us", "_min_us"): min(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", default="main", help="git ref of the baseline kernel")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--reference", action="store_true", help="also time gather + softmax")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    assert pa.kernel_available(), "the C++ kernel did not build"
    baseline = load_baseline(args.baseline)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for page_size in args.page_sizes:
            for kind, batch, qlens, ctxs, context in cases():
                q, kc, vc, table, starts, ctx = make_batch(qlens, ctxs, page_size, dtype)
                call = (q, kc, vc, table, starts, ctx, DIM**-0.5, 0)
                fns = {"kernel_us": lambda: pa.paged_attention(*call),
                       "baseline_us": lambda: baseline(*call)}
                if args.reference:
                    fns["reference_us"] = lambda: pa.paged_attention_reference(*call)
                work = sum(ctxs) * sum(qlens) / len(qlens)
                inner = max(1, min(200, int(2e6 / work)))
                times, minima = time_interleaved(fns, args.reps, inner)
                err = (pa.paged_attention(*call).float() - baseline(*call).float()).abs().max()
                emit({"bench": "paged_attention_kernel", "kind": kind, "dtype": dtype_name,
                      "batch": batch, "context": context, "query_tokens": sum(qlens),
                      "page_size": page_size, "heads": [HQ, HKV, DIM],
                      **{k: round(v, 1) for k, v in {**times, **minima}.items()},
                      "speedup": round(times["baseline_us"] / times["kernel_us"], 2),
                      "max_abs_diff_vs_baseline": float(err),
                      "threads": torch.get_num_threads(), "baseline_ref": args.baseline})


if __name__ == "__main__":
    main()

"""llama.cpp (``llama-cpp-python``) on the offline workload, batch 1: a latency reference.

Runs in its own venv (``make bench-peers``) on the default model's own GGUF file
(``--gguf``). Each request's prompt ids are evaluated, then its output length is
generated greedily with end-of-sequence ignored. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--workload", required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="llama.cpp threads (its OpenMP barrier spins: on a loaded "
                             "2-core machine 1 thread can be faster)")
    args = parser.parse_args()
    import llama_cpp

    with open(args.workload) as f:
        requests = json.load(f)
    llm = llama_cpp.Llama(args.gguf, n_ctx=1024, n_threads=args.threads, verbose=False)
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # eval() keeps no scores without logits_all (which would also compute the LM
        # head for every prompt token): read the last token's row from the context
        row = llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)),
                                     shape=(vocab,))
    t0 = time.perf_counter()
    out_tokens = 0
    for prompt, n in requests:
        llm.reset()
        llm.eval(prompt)
        for _ in range(n):  # greedy, ignoring end of sequence
            token = int(last_logits().argmax())
            llm.eval([token])
            out_tokens += 1
    elapsed = time.perf_counter() - t0
    in_tokens = sum(len(p) for p, _ in requests)
    print(json.dumps({
        "system": "llama.cpp-batch1-gguf", "elapsed_s": round(elapsed, 2),
        "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "total_tokens_per_s": round((out_tokens + in_tokens) / elapsed, 1),
        "env": {"device": "cpu", "llama_cpp_python": llama_cpp.__version__,
                "cpu_count": os.cpu_count(), "threads": args.threads,
                "python": platform.python_version()},
    }), flush=True)


if __name__ == "__main__":
    main()

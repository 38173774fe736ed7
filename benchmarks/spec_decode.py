"""Output tokens/s with and without speculative decoding (n-gram, draft model).

Two workloads: ``copy`` (each prompt asks the model to repeat a paragraph, so the
output copies spans of the prompt and prompt lookup finds them) and ``random``
(prompts of random token ids: the standard random workload, little to copy).
Greedy, one run per setting; one JSON line per (workload, batch, method): tok/s
with and without it, their ratio, acceptance rate and mean accepted length
(tokens per request step with drafts), and whether the text is the same.

    python benchmarks/spec_decode.py [--model DIR] [--batch 1 8] [--max-tokens 64] [-k 4]
        [--methods ngram draft_model] [--workloads copy random] [--draft-layers 8]
        [--draft-model DIR]

``draft_model`` without ``--draft-model`` is a self-draft: the target's first
``--draft-layers`` decoder layers with its own head.
"""
from __future__ import annotations

import argparse
import random
import time

from common import emit

from shoal.engine.sampling_params import SamplingParams
from shoal.frontend.llm import LLM

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins "
        "with a single step. All that glitters is not gold, and not all those who wander "
        "are lost. The early bird catches the worm, but the second mouse gets the cheese.")


def workload(name: str, batch: int) -> list:
    if name == "copy":
        prompt = f"Repeat the following text exactly, word for word.\n\n{TEXT}\n\nRepeated text:\n"
        return [prompt] * batch
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(128)]}
            for _ in range(batch)]


def run(args, prompts: list, speculative: dict | None) -> dict:
    options = dict(dtype=args.dtype, max_model_len=1024, threads_per_worker=args.threads)
    if speculative:
        options["speculative_config"] = speculative
    llm = LLM(args.model, **options)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        before = llm.stats()
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        stats = llm.stats()
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        drafts = stats.num_drafts - before.num_drafts
        draft_tokens = stats.num_draft_tokens - before.num_draft_tokens
        accepted = stats.num_accepted_tokens - before.num_accepted_tokens
        return {"tok_s": round(tokens / elapsed, 2), "output_tokens": tokens,
                "acceptance_rate": round(accepted / draft_tokens, 3) if draft_tokens else 0.0,
                "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else 1.0,
                "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}
    finally:
        llm.shutdown()


def speculative_config(args, method: str) -> dict:
    k = args.num_speculative_tokens
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
                "prompt_lookup_min": 2}
    spec = {"method": "draft_model", "num_speculative_tokens": k}
    if args.draft_model:
        spec["model"] = args.draft_model
    if args.draft_layers:
        spec["draft_layers"] = args.draft_layers
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default model)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=["ngram"],
                        choices=["ngram", "draft_model"])
    parser.add_argument("--workloads", nargs="+", default=["copy"], choices=["copy", "random"])
    parser.add_argument("--draft-model", default=None, help="draft checkpoint directory")
    parser.add_argument("--draft-layers", type=int, default=None,
                        help="draft_model: keep the first N decoder layers")
    args = parser.parse_args()
    for name in args.workloads:
        for batch in args.batch:
            prompts = workload(name, batch)
            plain = run(args, prompts, None)
            for method in args.methods:
                spec = speculative_config(args, method)
                fast = run(args, prompts, spec)
                emit({"bench": "spec_decode", "workload": name, "batch": batch,
                      "max_tokens": args.max_tokens, "dtype": args.dtype,
                      "speculative_config": spec, "plain_tok_s": plain["tok_s"],
                      "spec_tok_s": fast["tok_s"],
                      "speedup": round(fast["tok_s"] / plain["tok_s"], 3),
                      "acceptance_rate": fast["acceptance_rate"],
                      "mean_accepted_length": fast["mean_accepted_length"],
                      "same_tokens": plain["token_ids"] == fast["token_ids"]})


if __name__ == "__main__":
    main()

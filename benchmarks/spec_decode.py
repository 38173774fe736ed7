"""Output tokens/s with and without n-gram speculative decoding on a copy-heavy workload.

Each prompt asks the model to repeat a paragraph, so the output copies spans of
the prompt and prompt lookup finds them. Greedy, one run per setting, one JSON
line: tok/s with and without ngram, their ratio, acceptance rate and mean
accepted length (tokens per request step with drafts).

    python benchmarks/spec_decode.py [--model DIR] [--batch 1] [--max-tokens 64] [-k 4]
"""
from __future__ import annotations

import argparse
import time

from common import emit

from shoal.engine.sampling_params import SamplingParams
from shoal.frontend.llm import LLM

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins "
        "with a single step. All that glitters is not gold, and not all those who wander "
        "are lost. The early bird catches the worm, but the second mouse gets the cheese.")


def run(args, speculative: dict | None) -> dict:
    options = dict(dtype=args.dtype, max_model_len=1024, threads_per_worker=args.threads)
    if speculative:
        options["speculative_config"] = speculative
    llm = LLM(args.model, **options)
    try:
        prompt = f"Repeat the following text exactly, word for word.\n\n{TEXT}\n\nRepeated text:\n"
        prompts = [prompt] * args.batch
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
                "text": outputs[0].outputs[0].text[:80]}
    finally:
        llm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("-k", "--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    plain = run(args, None)
    spec = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
            "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    ngram = run(args, spec)
    emit({"bench": "spec_decode", "workload": "copy", "batch": args.batch,
          "max_tokens": args.max_tokens, "speculative_config": spec,
          "plain_tok_s": plain["tok_s"], "ngram_tok_s": ngram["tok_s"],
          "speedup": round(ngram["tok_s"] / plain["tok_s"], 3),
          "acceptance_rate": ngram["acceptance_rate"],
          "mean_accepted_length": ngram["mean_accepted_length"],
          "same_text": plain["text"] == ngram["text"]})


if __name__ == "__main__":
    main()

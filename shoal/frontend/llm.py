"""The offline API: ``from shoal import LLM, SamplingParams``.

    with LLM(tensor_parallel_size=2) as llm:             # None = the default model
        outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
        text = outputs[0].outputs[0].text
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from tqdm import tqdm

from shoal.engine.sampling_params import PoolingParams, SamplingParams
from shoal.engine_args import engine_config, executor_kwargs_options
from shoal.errors import EngineDeadError
from shoal.frontend.generation_defaults import default_sampling_params
from shoal.frontend.llm_engine import LLMEngine
from shoal.frontend.outputs import EmbeddingRequestOutput, RequestOutput
from shoal.frontend.prompts import PromptType, parse_prompts

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """A model served in this process's driver, its workers in child processes.

    Keyword arguments are vLLM's engine options (``shoal.engine_args``: the same
    table as the CLI's flags and the Ray Serve options), e.g. ``model`` (a local
    Hugging Face checkpoint directory; None for the default SmolLM2-135M-Instruct),
    ``tensor_parallel_size``, ``pipeline_parallel_size``, ``enable_expert_parallel``,
    ``distributed_executor_backend``, ``dtype``, ``max_model_len``, ``block_size``,
    ``kv_cache_memory`` (bytes per rank, CPU), ``gpu_memory_utilization``,
    ``enable_prefix_caching``, ``max_num_seqs``, ``max_num_batched_tokens``, ``seed``,
    ``enforce_eager``, ``kv_transfer_config``, ``speculative_config`` (a dict, vLLM's
    keys), ``enable_eplb`` and ``eplb_config`` (a dict: ``window_size``, ``step_interval``,
    ``num_redundant_experts``). ``executor_kwargs`` takes the executor's own names (``host``, ``bootstrap_port``, ``threads_per_worker``, ...).
    An unknown or badly typed option is a ValueError naming it.
    """

    def __init__(self, model: str | None = None, *, executor_kwargs: dict | None = None,
                 **engine_options):
        options = dict(engine_options)
        if model is not None:
            options["model"] = model
        options.update(executor_kwargs_options(executor_kwargs or {}))
        self.engine = LLMEngine(engine_config(options))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults (vLLM's)."""
        return default_sampling_params(self.engine.generation_defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in prompt order.

        A prompt is text, a token-id list, ``{"prompt": text}`` or
        ``{"prompt_token_ids": [...]}``; bad ones raise a ValueError naming the field.
        ``sampling_params=None`` takes the checkpoint's generation defaults.

        A failed worker group is replaced and its requests recomputed (within
        ``max_worker_restarts``). Beyond that budget the outputs that finished are
        returned whole, and every other one ends with ``finish_reason == "error"`` and
        the reason in ``RequestOutput.error``; later calls raise EngineDeadError.
        """
        prompts = parse_prompts(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts"
                )
        return self._run([
            lambda rid, p=prompt, sp=params: self.engine.add_request(rid, p, sp)
            for prompt, params in zip(prompts, params_list)], use_tqdm, "generate")

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[EmbeddingRequestOutput]:
        """Embed every prompt (the model's final hidden states, pooled); outputs in order.

        ``output.outputs.embedding`` is a list of floats (the model's hidden size),
        pooled as ``pooling_params`` says or by the engine's ``pooling`` option (last,
        mean or cls), normalised to unit length unless ``normalize=False``. Embedding
        requests share the scheduler with generation: they run their prefill (chunked
        when long) and finish without generating a token.
        """
        prompts = parse_prompts(prompts)
        params = pooling_params or PoolingParams()
        outputs = self._run([
            lambda rid, p=prompt: self.engine.add_embed_request(rid, p, params)
            for prompt in prompts], use_tqdm, "embed")
        return [EmbeddingRequestOutput.from_output(o) for o in outputs]

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to conversations, formatted with the model's chat template.

        ``tools`` (OpenAI function tools) go to the template as vLLM's ``LLM.chat`` does;
        parsing calls out of the replies is the server's job (``--tool-call-parser``).
        """
        extra = dict(chat_template_kwargs or {})
        if tools is not None:
            extra["tools"] = tools
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt, **extra,
            )
            for conv in conversations  # type: ignore[union-attr]
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, requests: list[Callable[[str], None]], use_tqdm: bool,
             desc: str) -> list[RequestOutput]:
        """Queue each request (its callable adds it under the id it is given), run them all."""
        order: dict[str, int] = {}
        try:
            for index, add in enumerate(requests):
                request_id = f"offline-{next(self._ids)}"
                add(request_id)
                order[request_id] = index
            results: list[RequestOutput | None] = [None] * len(order)
            bar = tqdm(total=len(order), desc=desc, disable=not use_tqdm or len(order) < 2)
            with bar:
                dead = False
                while not dead and self.engine.has_unfinished_requests():
                    try:
                        outputs = self.engine.step()
                    except EngineDeadError as exc:  # keep what finished; the rest fail
                        outputs, dead = self.engine.fail_unfinished(str(exc)), True
                    for output in outputs:
                        if output.finished and output.request_id in order:
                            results[order[output.request_id]] = output
                            bar.update(1)
        except BaseException:
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        return [r for r in results if r is not None]

    def stats(self):
        return self.engine.core.stats()

    def shutdown(self) -> None:
        """Stop every worker; no process is left behind."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

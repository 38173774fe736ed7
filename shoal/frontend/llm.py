"""The offline API: ``from shoal import LLM, SamplingParams``.

    with LLM(tensor_parallel_size=2) as llm:             # None = the default model
        outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
        text = outputs[0].outputs[0].text
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

from tqdm import tqdm

from shoal.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shoal.runtime.engine import LLMEngine
from shoal.runtime.outputs import RequestOutput
from shoal.runtime.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """A model served in this process's driver, its workers in child processes.

    Args mirror vLLM's: ``model`` (a local Hugging Face checkpoint directory,
    None for the default SmolLM2-135M-Instruct), ``tensor_parallel_size``,
    ``pipeline_parallel_size``, ``data_parallel_size``, ``enable_expert_parallel``,
    ``distributed_executor_backend``, ``placement_strategy`` (Ray: PACK or SPREAD), ``dtype``, ``max_model_len``, ``block_size``,
    ``kv_cache_memory`` (bytes per rank, CPU), ``gpu_memory_utilization``,
    ``enable_prefix_caching``, ``max_num_seqs``, ``max_num_batched_tokens``, ``seed``.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        data_parallel_size: int = 1,
        enable_expert_parallel: bool = False,
        pp_layer_partition: Sequence[int] | None = None,
        distributed_executor_backend: str = "mp",
        placement_strategy: str = "PACK",
        dtype: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        gpu_memory_utilization: float = 0.9,
        num_gpu_blocks_override: int | None = None,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 2048,
        seed: int = 0,
        executor_kwargs: dict | None = None,
    ):
        config = EngineConfig(
            model=ModelConfig(model=model, dtype=dtype, max_model_len=max_model_len, seed=seed),
            parallel=ParallelConfig(
                tp_size=tensor_parallel_size,
                pp_size=pipeline_parallel_size,
                dp_size=data_parallel_size,
                enable_expert_parallel=enable_expert_parallel,
                pp_layer_partition=tuple(pp_layer_partition) if pp_layer_partition else None,
                executor_backend=distributed_executor_backend,
                placement_strategy=placement_strategy,
            ),
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory=kv_cache_memory,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
                num_gpu_blocks_override=num_gpu_blocks_override,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
            ),
        )
        self.engine = LLMEngine(config, executor_kwargs=executor_kwargs)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompts)} prompts"
                )
        return self._run(prompts, params_list, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to conversations, formatted with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt,
                **(chat_template_kwargs or {}),
            )
            for conv in conversations  # type: ignore[union-attr]
        ]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[Prompt], params_list: Iterable[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        order: dict[str, int] = {}
        try:
            for index, (prompt, params) in enumerate(zip(prompts, params_list)):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, prompt, params)
                order[request_id] = index
            results: list[RequestOutput | None] = [None] * len(order)
            bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm or len(order) < 2)
            with bar:
                while self.engine.has_unfinished_requests():
                    for output in self.engine.step():
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

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:
            pass

"""Ray Serve LLM's ``engine_kwargs`` for shoal's server class (no Ray needed)."""
from __future__ import annotations

import pytest

from shoal.serve.ray_llm import plan_engine


def test_engine_kwargs_take_vllm_names():
    config, server = plan_engine(
        {"tensor_parallel_size": 2, "max-model-len": "512", "enable_prefix_caching": "false",
         "num_cpus_per_worker": 0.5, "max_core_restarts": 0, "tool_call_parser": "hermes",
         "enable_auto_tool_choice": True},
        model_id="tiny", model_source="/ckpt/tiny")
    assert config.model.model == "/ckpt/tiny"
    assert config.parallel.tp_size == 2 and config.parallel.executor_backend == "ray"
    assert config.parallel.num_cpus_per_worker == 0.5
    assert config.model.max_model_len == 512 and config.cache.enable_prefix_caching is False
    assert config.fault.max_core_restarts == 0
    assert server == {"tool_call_parser": "hermes", "enable_auto_tool_choice": True}


def test_the_model_defaults_to_the_model_id_and_the_backend_can_be_changed():
    config, server = plan_engine({"distributed_executor_backend": "mp"}, model_id="m")
    assert config.model.model == "m" and config.parallel.executor_backend == "mp"
    assert server == {"enable_auto_tool_choice": False}


def test_bad_engine_kwargs_are_named():
    with pytest.raises(ValueError, match="unknown engine_kwargs key 'tensor_size'.*"
                                         "tensor_parallel_size"):
        plan_engine({"tensor_size": 2}, model_id="m")
    with pytest.raises(ValueError, match="engine_kwargs 'model': the model comes from "
                                         "model_loading_config"):
        plan_engine({"model": "/x"}, model_id="m")
    with pytest.raises(ValueError, match="block-size must be int"):
        plan_engine({"block-size": "big"}, model_id="m")
    with pytest.raises(ValueError, match="unknown --tool-call-parser 'nope'"):
        plan_engine({"tool_call_parser": "nope"}, model_id="m")
    with pytest.raises(ValueError, match="model_source must be a local checkpoint"):
        plan_engine({}, model_id="m", model_source={"bucket_uri": "s3://x"})

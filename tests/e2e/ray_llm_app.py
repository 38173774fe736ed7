"""Run Ray Serve LLM's ``build_openai_app`` with shoal's server class until stdin closes.

    python tests/e2e/ray_llm_app.py '{"port": 8123, "models": [{"id": "a", "source": "/ckpt"}]}'

Started by tests/e2e/test_ray_llm.py under a Python where ``ray.serve.llm``
imports (``make ray-llm-env``: Ray's protocol models are vLLM's). It starts a local
2-CPU Ray instance, deploys one ``LLMConfig`` per model (one replica, one worker,
fractional CPUs so two models fit), prints ``READY`` once the application runs
(or ``FAILED <reason>``), then answers each stdin line ``{"call": hook, "model": id}``
with ``RESULT <json>`` or ``ERROR ...`` (the hook called through the replica's
Serve handle), and on end of stdin shuts Serve and Ray down.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

# before ray is imported (it reads them once): a one-node instance bound to 127.0.0.1
os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
os.environ.pop("RAY_ADDRESS", None)

import ray
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app

CPU = 0.25  # the replica's and its worker's share: 2 models x (0.25 + 0.25) + ingress 0.25


def llm_config(model: dict) -> LLMConfig:
    return LLMConfig(
        model_loading_config={"model_id": model["id"], "model_source": model["source"]},
        server_cls="shoal.serve.ray_llm:ShoalServer",
        engine_kwargs={"dtype": "float32", "max_model_len": 256,
                       "kv_cache_memory": 16 << 20, "num_cpus_per_worker": CPU,
                       **model.get("engine_kwargs", {})},
        deployment_config={"num_replicas": 1, "ray_actor_options": {"num_cpus": CPU},
                           "health_check_period_s": 2},
        log_engine_metrics=False,
    )


def call(command: dict) -> str:
    """One hook of a model's replica through its Serve handle, as Ray's ingress calls it."""
    handle = serve.get_deployment_handle(f"ShoalServer:{command['model']}", app_name="llm")
    try:
        return "RESULT " + json.dumps(getattr(handle, command["call"]).remote().result())
    except Exception as exc:  # noqa: BLE001 - the test reads the error
        return f"ERROR {type(exc).__name__}: {exc}".replace("\n", " ")


def main() -> int:
    spec = json.loads(sys.argv[1])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
             object_store_memory=100 << 20)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": spec["port"]})
        app = build_openai_app({
            "llm_configs": [llm_config(m) for m in spec["models"]],
            "ingress_deployment_config": {"ray_actor_options": {"num_cpus": CPU},
                                          "num_replicas": 1},
        })
        serve.run(app, name="llm", route_prefix="/")
        print("READY", flush=True)
        for line in sys.stdin:  # until the test closes it
            print(call(json.loads(line)), flush=True)
        return 0
    except Exception:  # noqa: BLE001 - any failure goes to the test as FAILED
        print("FAILED " + traceback.format_exc().replace("\n", "\\n"), flush=True)
        return 1
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())

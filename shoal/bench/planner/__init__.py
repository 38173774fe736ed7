"""Capacity planning: a roofline cost model of prefill and decode steps, a step-level
simulator of continuous batching driven by it, and a layout search with SLOs and cost.

``model_spec`` (parameters, FLOPs and KV bytes of a Hugging Face config),
``hardware`` (device profiles), ``cost_model`` (time of one engine step for a
layout), ``simulator`` (requests through a simplified scheduler), ``search``
(rank layouts), ``calibrate`` (fit the efficiency factors to measured results).
"""

"""Capacity planning: a roofline cost model of prefill and decode steps, a
discrete-event simulation of the engine's own scheduler timed by it, and a layout
search with SLOs and cost.

``model_spec`` (parameters, FLOPs and KV bytes of a Hugging Face config),
``hardware`` (device profiles), ``cost_model`` (time of one engine step for a
layout), ``simulator`` (requests through the real Scheduler on a virtual clock),
``search`` (rank layouts), ``calibrate`` (fit the efficiency factors to measured results).
"""

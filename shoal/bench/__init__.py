"""Benchmarks and capacity planning: ``shoal bench serve|throughput|latency|sweep|plot|plan``.

Flag names and result fields follow ``vllm bench`` so that results and scripts carry
over. This layer sits above ``serve`` and below ``cli``; nothing below imports it.
"""

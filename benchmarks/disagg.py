"""Disaggregated prefill/decode and the host KV tier: one JSON line per case (issue 16).

Cases (``--cases``, default all):

- ``transfer``: a large KV transfer between two processes through ShoalTransferConnector's
  own pieces (a producer rank's store and server in a child process, the consumer's
  fetch, checksum and page writes here), over shared memory, over ZeroMQ frames and over
  a torch.distributed gloo pair (``torch_backend``),
  against this machine's memory copy bandwidth (a tensor ``copy_`` of the same bytes).
  GB/s counts the bytes moved per second, as ``memcpy_gbps`` does. The producer saves
  each transfer when the consumer asks (as prefill steps do), so segments the consumer
  released are reused: ``transfer_gbps`` is the best warm transfer, ``cold_gbps`` the
  first (a fresh segment to map, a pair to build).
- ``offload``: TTFT of a request whose ``--prefix-len``-token prefix was pushed out of
  the KV cache, recomputed (no connector) vs loaded from the host tier
  (OffloadingConnector) vs from its local directory (a host tier of 2 pages, files in a
  temporary directory), offline ``LLM``, the default model unless ``--model``.
- ``mixed``: steady short decodes plus long prompts arriving, against one aggregated
  ``shoal serve`` on all cores vs ``shoal proxy`` over a prefill and a decode engine
  pinned to one core each (``taskset``); TTFT and TPOT p50/p99 of the short requests,
  and a decode-only run of the same short requests for the TPOT target.

    python benchmarks/disagg.py --cases transfer offload
    python benchmarks/disagg.py --cases mixed --duration 30
    python benchmarks/disagg.py --cases mixed --duration 30 --torch-backend gloo
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import httpx
import numpy as np
import torch
import zmq

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import emit, percentiles
from serving import make_prompts, one_request

from shoal.comm.codec import decode
from shoal.comm.kv_wire import KVFetchOrder, KVSource, KVWorkerHello, host_id
from shoal.worker.kv_link import LinkClient, LinkHost
from shoal.worker.kv_store import KVStore, gather_pages, write_pages
from shoal.worker.kv_transfer import Puller, StoreServer

# -- transfer ---------------------------------------------------------------------------------


def _producer(bind: str, shape: tuple, commands, saved, link_endpoint) -> None:
    layers, _, tokens, heads, dim = shape
    page_size = 16
    pages = tokens // page_size
    caches = [torch.randn(2, pages, page_size, heads, dim) for _ in range(layers)]
    store = KVStore(1 << 34, 3600, use_shm=True, rank=0)
    zctx = zmq.Context()
    link_host = LinkHost("127.0.0.1", "gloo")
    link_endpoint.put(link_host.endpoint)
    server = StoreServer(zctx, bind, store, 0, torch.float32, None, link_host)
    server.start()
    # one transfer saved at a time, when the consumer asks, as a prefill engine's steps
    # save them: a segment the consumer released is reused (the steady state)
    while (transfer_id := commands.get()) is not None:
        store.save(transfer_id, shape, np.dtype(np.float32),
                   lambda out: gather_pages(caches, list(range(pages)), tokens, out))
        saved.put(store.segments_reused)
    server.stopping.set()
    server.join()
    link_host.close()
    store.close()


def bench_transfer(args) -> None:
    shape = (args.layers, 2, args.tokens, args.kv_heads, args.head_dim)
    nbytes = int(np.prod(shape)) * 4
    src, dst = torch.empty(nbytes // 4), torch.empty(nbytes // 4)
    src.normal_()
    dst.copy_(src)
    copies = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - start)
    memcpy_gbps = nbytes / min(copies) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        bind = f"ipc://{tmp}/store"
        ctx = mp.get_context("spawn")
        commands, saved, link_endpoint = ctx.Queue(), ctx.Queue(), ctx.Queue()
        modes = (("shm", host_id(), False), ("zmq", "", False), ("gloo", "", True))
        child = ctx.Process(target=_producer, args=(bind, shape, commands, saved,
                                                    link_endpoint))
        child.start()
        try:
            link = link_endpoint.get(timeout=600)
            page_size = 16
            caches = [torch.zeros(2, args.tokens // page_size, page_size, args.kv_heads,
                                  args.head_dim) for _ in range(args.layers)]
            page_ids = list(range(args.tokens // page_size))
            zctx = zmq.Context()
            reports = zctx.socket(zmq.PULL)
            reports.bind(f"ipc://{tmp}/reports")
            for m, (mode, own_host, use_link) in enumerate(modes):
                hello = KVWorkerHello(0, 0, "", 0, args.kv_heads, args.kv_heads, args.layers,
                                      args.head_dim, "float32", own_host)
                links = LinkClient("gloo") if use_link else None
                puller = Puller(zctx, f"ipc://{tmp}/orders", f"ipc://{tmp}/reports", hello,
                                fetches=True, links=links)
                source = KVSource(bind, 0, args.kv_heads, host_id(), link if use_link else "")
                seconds, reused = [], []
                for i in range(args.repeats):
                    tid = f"t{i + m * args.repeats}"
                    commands.put(tid)
                    reused.append(saved.get(timeout=600))
                    start = time.perf_counter()
                    puller._start(KVFetchOrder(tid, args.tokens, [source], [1], 30.0))
                    while tid in puller._jobs:
                        puller.step(100)
                    report = decode(reports.recv_multipart())
                    assert report.ok, report.error
                    write_pages(caches, puller.take(tid), 0, args.tokens, page_ids)
                    seconds.append(time.perf_counter() - start)
                    puller.release(tid)  # as the worker does after writing the pages
                    puller.step(0)
                    time.sleep(0.05)  # (not timed) the store takes the release back
                for sock in (puller.orders, puller.reports, *puller._dealers.values()):
                    sock.close(0)
                if links is not None:
                    links.close()
                # the first transfer of a mode maps a fresh segment (shm) or pairs (gloo):
                # cold; the rest run through reused segments and pairs: warm
                best = min(seconds[1:] or seconds)
                emit({"bench": "disagg", "case": "transfer", "mode": mode, "bytes": nbytes,
                      "shape": list(shape), "transfer_gbps": round(nbytes / best / 1e9, 3),
                      "memcpy_gbps": round(memcpy_gbps, 3),
                      "fraction_of_memcpy": round(nbytes / best / 1e9 / memcpy_gbps, 3),
                      "cold_gbps": round(nbytes / seconds[0] / 1e9, 3),
                      "segments_reused": reused[-1] - reused[0],
                      "seconds": percentiles(seconds)})
            reports.close(0)
            zctx.term()
        finally:
            commands.put(None)
            child.join(60)
            if child.is_alive():
                child.kill()


# -- offload ----------------------------------------------------------------------------------


def bench_offload(args) -> None:
    from shoal import LLM, SamplingParams
    from shoal.checkpoint.default_model import ensure_default_model

    model = args.model or str(ensure_default_model(progress=False))
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    rounds = 3
    prompts = make_prompts(2 * rounds + 1, args.prefix_len, vocab, args.seed)
    tails = make_prompts(2 * rounds + 1, 8, vocab, args.seed + 1)
    budget = int(_kv_bytes_per_token(model) * (args.prefix_len + 64))  # one prompt at a time
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    results = {}
    local_dir = tempfile.mkdtemp(prefix="shoal-bench-kv-")
    directory = {"num_cpu_blocks": 2, "local_dir": os.path.join(local_dir, "kv"),
                 "local_dir_bytes": 8 * budget}  # the host tier too small: files serve
    cases = (("recompute", {}), ("host_tier", {"num_cpu_blocks": args.prefix_len // 16 * 4}),
             ("directory", directory))
    for name, extra in cases:
        options = {"kv_transfer_config": {"kv_connector": "OffloadingConnector",
                                          "kv_connector_extra_config": extra}} if extra else {}
        with LLM(model, dtype="float32", kv_cache_memory=budget, max_num_seqs=1,
                 block_size=16, **options) as llm:
            llm.generate([prompts[-1] + tails[-1]], first, use_tqdm=False)  # warm-up
            ttfts, cached, tokens = [], [], []
            for r in range(rounds):
                prefix, filler = prompts[2 * r], prompts[2 * r + 1]
                llm.generate([prefix + tails[2 * r]], first, use_tqdm=False)
                llm.generate([filler + tails[2 * r + 1]], first, use_tqdm=False)  # evicts it
                start = time.perf_counter()
                out = llm.generate([prefix + tails[(2 * r + 2) % len(tails)]], first,
                                   use_tqdm=False)[0]
                ttfts.append(time.perf_counter() - start)
                cached.append(out.num_cached_tokens)
                tokens.append(out.outputs[0].token_ids)
            stats = llm.engine.stats()
            results[name] = (ttfts, cached, tokens, stats.kv_offload_hit_tokens,
                             stats.kv_offload_disk_hit_tokens)
    os.rmdir(local_dir)  # the engine removed its files and the directory it made
    emit({"bench": "disagg", "case": "offload", "model": os.path.basename(model),
          "prefix_len": args.prefix_len,
          "ttft_recompute": percentiles(results["recompute"][0]),
          "ttft_host_tier": percentiles(results["host_tier"][0]),
          "ttft_directory": percentiles(results["directory"][0]),
          "cached_tokens": {k: v[1] for k, v in results.items()},
          "host_tier_hit_tokens": results["host_tier"][3],
          "directory_hit_tokens": results["directory"][4],
          "same_tokens": results["recompute"][2] == results["host_tier"][2]
          == results["directory"][2]})


def _kv_bytes_per_token(model: str) -> int:
    cfg = json.load(open(os.path.join(model, "config.json")))
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return cfg["num_hidden_layers"] * 2 * kv * dim * 4


# -- mixed workload ---------------------------------------------------------------------------


async def _workload(base_url: str, vocab: int, args, long_prompts: bool) -> dict:
    """Steady short decodes (``--short-streams`` at a time) plus long prompts arriving."""
    short = make_prompts(1000, 16, vocab, args.seed)
    long = make_prompts(100, args.prefix_len, vocab, args.seed + 7)
    outcomes, long_outcomes = [], []
    async with httpx.AsyncClient(base_url=base_url, timeout=None) as client:
        # warm-up, not measured: first steps, first transfers (sockets, pairs), caches
        for prompt in (short[-1], short[-2], long[-1]):
            await one_request(client, "m", prompt, 4)
        deadline = time.perf_counter() + args.duration
        async def stream(worker: int) -> None:
            i = worker
            while time.perf_counter() < deadline:
                outcomes.append(await one_request(client, "m", short[i % 1000],
                                                  args.short_output))
                i += args.short_streams

        async def arrivals() -> None:
            i = 0
            while long_prompts and time.perf_counter() < deadline:
                await asyncio.sleep(args.long_every)
                long_outcomes.append(await one_request(client, "m", long[i % 100], 4))
                i += 1

        await asyncio.gather(arrivals(), *(stream(w) for w in range(args.short_streams)))
    done = [o for o in outcomes if o.ok]
    tpot = [(o.e2e - o.ttft) / (o.output_tokens - 1) for o in done if o.output_tokens > 1]
    return {"short_completed": len(done), "short_failed": len(outcomes) - len(done),
            "long_completed": sum(o.ok for o in long_outcomes),
            "ttft": percentiles([o.ttft for o in done]), "tpot": percentiles(tpot),
            "long_ttft": percentiles([o.ttft for o in long_outcomes if o.ok])}


def bench_mixed(args) -> None:
    from shoal.checkpoint.default_model import ensure_default_model
    from shoal.serve.launcher import ServerProcess

    model = args.model or str(ensure_default_model(progress=False))
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    base = ["--model", model, "--dtype", "float32", "--served-model-name", "m",
            "--max-model-len", "2048", "--kv-cache-memory", str(1 << 28)]

    def role(name: str) -> list[str]:
        config = {"kv_connector": "ShoalTransferConnector", "kv_role": name}
        if args.torch_backend:
            config["kv_connector_extra_config"] = {"torch_backend": args.torch_backend}
        return ["--kv-transfer-config", json.dumps(config)]

    records = {}
    with ServerProcess(base) as agg:
        records["aggregated_decode_only"] = asyncio.run(_workload(agg.url, vocab, args, False))
        records["aggregated"] = asyncio.run(_workload(agg.url, vocab, args, True))
    with contextlib.ExitStack() as stack:
        prefill = ServerProcess(base + role("kv_producer") + ["--threads-per-worker", "1"])
        decode = ServerProcess(base + role("kv_consumer") + ["--threads-per-worker", "1"])
        for server, core in ((prefill, 0), (decode, 1)):
            stack.enter_context(server)
            _pin(server, core)
        proxy = stack.enter_context(ServerProcess(
            ["--prefill", prefill.url, "--decode", decode.url], command="proxy"))
        records["disaggregated_decode_only"] = asyncio.run(
            _workload(proxy.url, vocab, args, False))
        records["disaggregated"] = asyncio.run(_workload(proxy.url, vocab, args, True))
    for name, record in records.items():
        emit({"bench": "disagg", "case": "mixed", "setup": name, "model": os.path.basename(model),
              "duration_s": args.duration, "long_prompt_len": args.prefix_len, **record})
    target = records["disaggregated"]["tpot"].get("p99_ms", 0)
    alone = records["disaggregated_decode_only"]["tpot"].get("p99_ms", 0)
    emit({"bench": "disagg", "case": "mixed_target", "tpot_p99_ratio":
          round(target / alone, 3) if alone else None, "target": 1.2})


def _pin(server, core: int) -> None:
    """Pin a server's whole process tree (API server, engine core, workers) to ``core``."""
    import psutil

    procs = [psutil.Process(server.proc.pid)]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_affinity([core])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["transfer", "offload", "mixed"],
                        choices=["transfer", "offload", "mixed"])
    parser.add_argument("--model", default=None, help="checkpoint (default: SmolLM2-135M)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--short-streams", type=int, default=2)
    parser.add_argument("--short-output", type=int, default=32)
    parser.add_argument("--long-every", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-backend", choices=["gloo", "nccl"], default=None,
                        help="mixed: the 1P1D engines move pages over torch.distributed")
    args = parser.parse_args()
    for case in args.cases:
        {"transfer": bench_transfer, "offload": bench_offload, "mixed": bench_mixed}[case](args)


if __name__ == "__main__":
    main()

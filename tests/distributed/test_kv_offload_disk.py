"""OffloadingConnector's local-directory tier, with real worker processes and files.

The KV cache holds 20 pages of 4 tokens and the host tier 2: a 24-token shared prefix
(6 pages) pushed out by three other prompts leaves both, and only the directory still
has it. The last request, which shares the prefix, loads it from the files (24 cached
tokens, the directory's hit counter says 6 pages) and writes the tokens the engine
writes without any tier. A corrupted, foreign or missing file is recomputed from there
on with the same tokens; the directory stays within its byte bound; it is removed at
shutdown unless it persists, and a later engine of the same model reads what persisted.
"""
import os
import signal

import numpy as np
import pytest
from factories import tiny_checkpoint

from shoal import LLM, SamplingParams
from shoal.comm.kv_disk_wire import page_file_path, write_page_file
from shoal.engine.core_io import CoreStats
from shoal.engine.kv_manager import _ROOT_HASH, hash_page
from shoal.serve.metrics import ServerMetrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SHARED = [(5 * j + 3) % 200 + 1 for j in range(24)]
FILLERS = [[(11 * i + 7 * j) % 200 + 1 for j in range(24)] for i in range(3)]
PROMPTS = [SHARED + [7, 8]] + FILLERS + [SHARED + [9, 10]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PAGE_BYTES = 2 * 2 * 4 * 3 * 8 * 4  # layers * (k, v) * page_size * kv_heads * head_dim * fp32


def shared_keys() -> list[str]:
    """The page keys (chained prefix hashes) of SHARED's six pages."""
    keys, parent = [], _ROOT_HASH
    for i in range(6):
        parent = hash_page(parent, tuple(SHARED[4 * i:4 * i + 4]))
        keys.append(parent.hex())
    return keys


def dir_bytes(root) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def run(checkpoint, before_last=None, prompts=PROMPTS, tp=1, pp=1, **options):
    """Greedy tokens, cached-token counts and final stats, one request at a time;
    ``before_last(llm)`` runs before the last prompt; the directory's size is checked
    against its bound after every request."""
    extra = options.get("kv_transfer_config", {}).get("kv_connector_extra_config", {})
    with LLM(checkpoint, dtype="float32", block_size=4,
             kv_cache_memory=PAGE_BYTES * 20 // (tp * pp), max_num_seqs=1,
             tensor_parallel_size=tp, pipeline_parallel_size=pp,
             executor_kwargs={"threads_per_worker": 1}, **options) as llm:
        outs = []
        for i, prompt in enumerate(prompts):
            if before_last is not None and i == len(prompts) - 1:
                before_last(llm)
            outs.append(llm.generate([prompt], GREEDY, use_tqdm=False)[0])
            if "local_dir" in extra:
                assert dir_bytes(extra["local_dir"]) <= extra["local_dir_bytes"]
                assert llm.engine.stats().kv_offload_disk_bytes <= extra["local_dir_bytes"]
        return ([o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs],
                llm.engine.stats())


def disk(local_dir, local_dir_bytes=1 << 20, **more):
    return {"kv_transfer_config": {"kv_connector": "OffloadingConnector",
                                   "kv_connector_extra_config": {
                                       "num_cpu_blocks": 2, "local_dir": str(local_dir),
                                       "local_dir_bytes": local_dir_bytes, **more}}}


def rank_dirs(local_dir) -> list[str]:
    return sorted(os.path.join(local_dir, d) for d in os.listdir(local_dir))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint("llama", tmp_path_factory.mktemp("ckpt"), num_hidden_layers=2)


@pytest.fixture(scope="module")
def reference(ckpt):
    tokens, cached, _ = run(ckpt)
    assert cached[-1] == 0  # without a tier the prefix is recomputed
    return tokens


def test_prefix_evicted_from_cache_and_host_tier_is_loaded_from_the_directory(
        ckpt, reference, tmp_path):
    local = tmp_path / "kv"
    seen = {}

    def look(llm):
        seen["dirs"] = rank_dirs(local)
        seen["files"] = {k for k in shared_keys() if os.path.exists(page_file_path(
            seen["dirs"][0], k))}

    tokens, cached, stats = run(ckpt, look, **disk(local))
    assert tokens == reference
    assert seen["files"] == set(shared_keys())  # the whole prefix had reached the files
    assert cached[-1] == len(SHARED)
    assert stats.kv_offload_disk_hit_pages >= 4 and stats.kv_offload_hit_pages == 6
    assert stats.kv_offload_disk_hit_tokens == 4 * stats.kv_offload_disk_hit_pages
    assert stats.kv_offload_disk_written_pages > 0 and stats.kv_offload_disk_failed_pages == 0
    assert 0 < stats.kv_offload_disk_bytes <= stats.kv_offload_disk_capacity_bytes == 1 << 20
    assert not local.exists()  # removed at shutdown (the engine made it)


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "missing"])
def test_a_bad_file_is_recomputed_with_the_same_tokens(ckpt, reference, tmp_path, damage):
    local = tmp_path / "kv"
    key = shared_keys()[2]  # the third page: the first two still load

    def spoil(llm):
        path = page_file_path(rank_dirs(local)[0], key)
        if damage == "flip":
            with open(path, "r+b") as f:
                f.seek(-5, os.SEEK_END)
                byte = f.read(1)
                f.seek(-5, os.SEEK_END)
                f.write(bytes([byte[0] ^ 0x5A]))
        elif damage == "truncate":
            os.truncate(path, os.path.getsize(path) - 16)
        elif damage == "foreign":  # same name, another engine's identity
            write_page_file(os.path.dirname(path), "someone-else", key,
                            np.zeros((2, 2, 4, 3, 8), dtype=np.float32))
        else:
            os.unlink(path)

    tokens, cached, stats = run(ckpt, spoil, **disk(local))
    assert tokens == reference
    assert cached[-1] == 8  # two pages, then recomputed from the bad one
    assert stats.kv_offload_disk_failed_pages >= 4
    assert not local.exists()


def test_a_bad_file_on_one_rank_cuts_the_prefix_for_all_ranks(ckpt, reference, tmp_path):
    """tp2: rank 1's copy of the fourth page is corrupt, rank 0's is fine; both ranks
    load three pages only, the rest is recomputed."""
    local = tmp_path / "kv"

    def spoil(llm):
        ranks = rank_dirs(local)
        assert len(ranks) == 2
        rank1, = (r for r in ranks if r.endswith("-tp1"))
        with open(page_file_path(rank1, shared_keys()[3]), "r+b") as f:
            f.seek(-3, os.SEEK_END)
            f.write(b"\x00\x01\x02")

    tokens, cached, stats = run(ckpt, spoil, tp=2, **disk(local))
    assert tokens == reference
    assert cached[-1] == 12
    assert stats.kv_offload_disk_failed_pages >= 3
    assert not local.exists()


def test_the_directory_stays_within_its_bound_at_tp2(ckpt, reference, tmp_path):
    local = tmp_path / "kv"
    bound = 6 * 2 * (PAGE_BYTES // 2 + 400)  # about six pages of both ranks' files
    tokens, _, stats = run(ckpt, tp=2, **disk(local, bound))
    assert tokens == reference
    assert stats.kv_offload_disk_written_pages > 6  # more went in than fit: some removed
    assert 0 < stats.kv_offload_disk_bytes <= bound
    assert not local.exists()


def test_a_persisted_directory_serves_a_later_engine(ckpt, reference, tmp_path):
    local = tmp_path / "kv"
    local.mkdir()  # the user's directory: kept, only the files in it are ours
    run(ckpt, **disk(local, local_dir_persist=True))
    assert all(os.listdir(d) for d in rank_dirs(local))
    prompts = [FILLERS[0], SHARED + [9, 10]]  # the first step has the ranks index the files
    tokens, cached, stats = run(ckpt, prompts=prompts, **disk(local))
    assert tokens[-1] == reference[-1]
    assert cached[-1] == len(SHARED) and stats.kv_offload_disk_hit_pages == 6
    assert local.exists() and os.listdir(local) == []  # not persisted this time: removed


def test_directory_counters_reach_metrics():
    metrics = ServerMetrics("m")
    base = dict(num_running=0, num_waiting=0, kv_usage=0.0, num_pages=20,
                prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0, num_steps=0)
    metrics.engine_stats(CoreStats(**base, kv_offload_disk_hit_pages=6,
                                   kv_offload_disk_failed_pages=4, kv_offload_disk_bytes=9000,
                                   kv_offload_disk_capacity_bytes=1 << 20))
    text = metrics.render().decode()
    for line in ('shoal:kv_offload_disk_hit_pages_total{model_name="m"} 6.0',
                 'shoal:kv_offload_disk_failed_pages_total{model_name="m"} 4.0',
                 'shoal:kv_offload_disk_bytes{model_name="m"} 9000.0',
                 'shoal:kv_offload_disk_capacity_bytes{model_name="m"} 1.048576e+06'):
        assert line in text, line


def test_pipeline_stages_spill_and_load_their_own_layers(ckpt, reference, tmp_path):
    """pp2: each stage's ranks keep their layers' pages in their tier and files; the
    prefix comes back from the directory on both stages with the same tokens."""
    local = tmp_path / "kv"
    seen = {}
    tokens, cached, stats = run(ckpt, lambda llm: seen.update(dirs=rank_dirs(local)), pp=2,
                                **disk(local))
    assert tokens == reference
    assert sorted(d[-8:] for d in seen["dirs"]) == ["-pp0-tp0", "-pp1-tp0"]
    assert cached[-1] == len(SHARED) and stats.kv_offload_disk_hit_pages >= 4
    assert not local.exists()


def test_the_files_outlive_a_replaced_worker_group(ckpt, tmp_path):
    """kill -9 of the worker once the prefix is only in the files: the new group's host
    tier is empty, but the directory is indexed again from the files once its rank says
    hello (a filler's first step), and the prefix comes back from them; no file is left."""
    local = tmp_path / "kv"
    extra = [(13 * j + 5) % 200 + 1 for j in range(24)]
    prompts = PROMPTS[:-1] + [extra] + PROMPTS[-1:]
    reference, _, _ = run(ckpt, prompts=prompts)
    killed = {}
    with LLM(ckpt, dtype="float32", block_size=4, kv_cache_memory=PAGE_BYTES * 20,
             max_num_seqs=1, executor_kwargs={"threads_per_worker": 1}, **disk(local)) as llm:
        outs = []
        for i, prompt in enumerate(prompts):
            if i == len(prompts) - 2:
                assert all(os.path.exists(page_file_path(rank_dirs(local)[0], k))
                           for k in shared_keys())
                killed["pid"] = llm.engine.core.executor.pids[0]
                os.kill(killed["pid"], signal.SIGKILL)
            outs.append(llm.generate([prompt], GREEDY, use_tqdm=False)[0])
        stats = llm.engine.stats()
        assert llm.engine.core.executor.pids[0] != killed["pid"]
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert stats.num_worker_restarts == 1
    assert outs[-1].num_cached_tokens == len(SHARED)
    assert stats.kv_offload_disk_hit_pages == 6  # the host tier went with the old group
    assert not local.exists()

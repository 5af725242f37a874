"""Pure engine parts with exact expected outputs: block manager, scheduler, sampler filters."""
import pytest
import torch

from moe_rt.config import EngineConfig
from moe_rt.engine.block_manager import BlockManager
from moe_rt.engine.sampler import filter_logits
from moe_rt.engine.scheduler import Scheduler
from moe_rt.engine.sequence import Sequence, Status
from moe_rt.sampling_params import SamplingParams


def seq(i, n):
    return Sequence(i, f"r{i}", 0, list(range(n)), SamplingParams())


def test_block_manager_pairs_checks_with_actions():
    bm = BlockManager(num_blocks=3, block_size=4)
    s = seq(0, 5)
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert s.block_table == [0, 1] and bm.num_free == 1
    s.token_ids += [9, 9, 9]  # 8 tokens: still 2 blocks
    assert bm.can_append(s)
    bm.append(s)
    assert s.block_table == [0, 1]
    s.token_ids.append(9)  # 9 tokens: needs a third block
    bm.append(s)
    assert s.block_table == [0, 1, 2] and bm.num_free == 0
    s.token_ids.append(9)
    assert bm.can_append(s)  # the 10th token still fits in block 2
    assert not bm.can_allocate(seq(1, 1))
    bm.deallocate(s)
    assert bm.num_free == 3 and s.block_table == []


def test_scheduler_decodes_running_then_admits_and_preempts_newest():
    bm = BlockManager(num_blocks=4, block_size=2)
    sch = Scheduler(EngineConfig(max_num_seqs=8), bm)
    a, b = seq(0, 3), seq(1, 3)
    sch.add(a)
    sch.add(b)
    prefill, decode = sch.schedule()
    assert prefill == [a, b] and decode == [] and bm.num_free == 0
    a.token_ids.append(1)  # both now need their 4th slot in block 1: fits
    b.token_ids.append(1)
    c = seq(2, 1)
    sch.add(c)  # no free block: c waits while a and b decode
    prefill, decode = sch.schedule()
    assert prefill == [] and decode == [a, b] and list(sch.waiting) == [c]
    a.token_ids.append(1)  # 5 tokens: a needs a third block, none free -> b (newest) is preempted
    b.token_ids.append(1)
    prefill, decode = sch.schedule()
    assert decode == [a] and b.status == Status.WAITING and list(sch.waiting) == [b, c]
    assert prefill == [] and sch.num_preemptions == 1 and b.block_table == []


def test_scheduler_mixes_new_prompts_into_a_decode_step():
    bm = BlockManager(num_blocks=100, block_size=4)
    sch = Scheduler(EngineConfig(max_num_batched_tokens=10), bm)
    a = seq(0, 3)
    sch.add(a)
    assert sch.schedule() == ([a], [])
    a.token_ids.append(1)
    b, long = seq(1, 5), seq(2, 30)
    sch.add(b)
    sch.add(long)
    prefill, decode = sch.schedule()  # budget 10: 1 decode token + 5 prompt tokens, the long one waits
    assert decode == [a] and prefill == [b] and list(sch.waiting) == [long]


def test_scheduler_respects_token_budget_but_admits_a_long_prompt_alone():
    bm = BlockManager(num_blocks=100, block_size=4)
    sch = Scheduler(EngineConfig(max_num_batched_tokens=10), bm)
    long, short = seq(0, 30), seq(1, 3)
    sch.add(long)
    sch.add(short)
    assert sch.schedule() == ([long], [])
    long.token_ids.append(1)
    prefill, decode = sch.schedule()
    assert prefill == [short] and decode == [long]


def test_top_k_and_top_p_filters_exact():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    out = filter_logits(logits, 1.0, top_k=2, top_p=1.0)
    assert torch.isinf(out[2:]).all() and torch.equal(out[:2], logits[:2])
    probs = logits.softmax(-1)  # [0.644, 0.237, 0.087, 0.032]
    out = filter_logits(logits, 1.0, top_k=0, top_p=0.8)  # 0.644 < 0.8 <= 0.881: keep two
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    out = filter_logits(logits, 1.0, top_k=0, top_p=0.5)  # the top token alone already covers 0.5
    assert torch.isfinite(out).tolist() == [True, False, False, False]
    assert probs[0] > 0.5
    out = filter_logits(logits, 2.0, 0, 1.0)
    assert torch.allclose(out, logits / 2)


def test_kv_budget_rules():
    """Given: taken as is. Not given: 1 GiB on CPU, or what every running sequence at the full
    context could fill when that is less; on CUDA utilization x total, less what the
    weights use and the expert cache reserves, refused in one line when nothing is left."""
    from moe_rt.engine.kv_budget import CPU_DEFAULT_BYTES, GIB, gpu_budget, kv_cache_bytes
    from moe_rt.errors import MoeRtError

    cpu = torch.device("cpu")
    assert kv_cache_bytes(EngineConfig(kv_cache_memory_gb=0.5), cpu) == GIB // 2
    assert kv_cache_bytes(EngineConfig(), cpu, reserve_bytes=10 * GIB) == CPU_DEFAULT_BYTES
    assert kv_cache_bytes(EngineConfig(), cpu, most_bytes=5 * 2**20) == 5 * 2**20
    assert kv_cache_bytes(EngineConfig(), cpu, most_bytes=4 * GIB) == CPU_DEFAULT_BYTES
    assert kv_cache_bytes(EngineConfig(kv_cache_memory_gb=0.5), cpu, most_bytes=2**20) == GIB // 2
    assert gpu_budget(total=140 * GIB, used=30 * GIB, reserve_bytes=20 * GIB, utilization=0.9) == 76 * GIB
    with pytest.raises(MoeRtError, match="no GPU memory is left for the KV cache"):
        gpu_budget(total=80 * GIB, used=60 * GIB, reserve_bytes=15 * GIB, utilization=0.9)


def test_cpu_kv_cache_holds_what_the_running_sequences_can_fill(mixtral_dir):
    """Without kv_cache_memory_gb, a CPU engine's cache is max_num_seqs full contexts when that is
    under 1 GiB (the tiny model's 256 positions), not a gigabyte it never touches."""
    from moe_rt_app import LLM

    llm = LLM(mixtral_dir, progress=False, max_num_seqs=3, max_model_len=100, kv_block_size=16)
    bs = 16
    assert llm.engine.max_model_len == 100
    assert llm.engine.blocks.num_blocks == 3 * -(-100 // bs)

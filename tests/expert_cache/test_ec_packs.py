"""Expert packs: the bytes are the checkpoint's, a stale or corrupt pack is refused (explicit
pack_dir) or rewritten (automatic), and greedy output with packs equals all-resident."""
import json
import logging
import os

import pytest
import torch

from checkpoints import write_checkpoint
from expert_cache.packs import (ALIGN, INDEX, PackError, disk_tier, open_pack, pack_cache_dir,
                                read_index, write_pack)
from moe_rt.checkpoint import CheckpointReader
from moe_rt.errors import MoeRtError
from moe_rt.loader import load_spec
from moe_rt_app import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [100, 3, 44, 55]]
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture()
def model(tmp_path):
    return str(write_checkpoint(tmp_path / "mix", "mixtral", num_hidden_layers=2))


def parts(model):
    return load_spec(model), CheckpointReader(model)


def test_pack_holds_each_expert_contiguous_aligned_with_the_checkpoints_bytes(model, tmp_path):
    spec, reader = parts(model)
    write_pack(reader, spec, tmp_path / "p")
    idx = read_index(tmp_path / "p")
    assert idx.stride % ALIGN == 0 and idx.stride >= idx.expert_bytes
    E = spec.num_experts
    for l, name in enumerate(idx.files):
        raw = (tmp_path / "p" / name).read_bytes()
        assert len(raw) == E * idx.stride
        for e in range(E):
            w13, w2 = reader.read_expert(spec, l, e)
            want = torch.cat([w13.reshape(-1), w2.reshape(-1)]).view(torch.uint8).numpy().tobytes()
            rec = raw[e * idx.stride:(e + 1) * idx.stride]
            assert rec[:idx.expert_bytes] == want and set(rec[idx.expert_bytes:]) <= {0}
    tier = open_pack(tmp_path / "p", reader, spec)
    D, I = spec.hidden_size, spec.moe.intermediate_size
    for key in [(0, 0), (1, E - 1), (0, 3)]:
        w13, w2 = torch.empty(2 * I, D), torch.empty(D, I)
        tier.read_into(key, w13, w2)
        a, b = reader.read_expert(spec, *key)
        assert torch.equal(w13, a) and torch.equal(w2, b)
    tier.close()


def test_a_pack_in_another_dtype_converts_like_the_checkpoint_reader(model, tmp_path):
    spec, reader = parts(model)
    write_pack(reader, spec, tmp_path / "p", torch.bfloat16)
    tier = open_pack(tmp_path / "p", reader, spec)
    D, I = spec.hidden_size, spec.moe.intermediate_size
    w13, w2 = torch.empty(2 * I, D), torch.empty(D, I)
    tier.read_into((1, 2), w13, w2)
    a, b = reader.read_expert(spec, 1, 2)
    assert torch.equal(w13, a.bfloat16().float()) and torch.equal(w2, b.bfloat16().float())
    tier.close()


def touch_checkpoint(model):
    """Rewrite the checkpoint's weights file as a new one (same bytes, new mtime)."""
    for name in os.listdir(model):
        if name.endswith(".safetensors"):
            path = os.path.join(model, name)
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_a_stale_pack_is_refused_or_rewritten(model, tmp_path, caplog):
    spec, reader = parts(model)
    write_pack(reader, spec, tmp_path / "p")
    touch_checkpoint(model)
    spec, reader = parts(model)
    with pytest.raises(PackError, match="stale"):
        open_pack(tmp_path / "p", reader, spec)
    with pytest.raises(MoeRtError, match=r"stale.*moe-rt pack-experts") as e:
        disk_tier(reader, spec, torch.float32, str(tmp_path / "p"))
    assert "\n" not in str(e.value)
    # The automatic pack: written on first use (one notice), reused, rewritten when stale.
    with caplog.at_level(logging.WARNING, logger="expert_cache.packs"):
        disk_tier(reader, spec, torch.float32, None).close()
        disk_tier(reader, spec, torch.float32, None).close()
    assert sum("writing an expert pack" in r.message for r in caplog.records) == 1
    first = pack_cache_dir(reader, torch.float32)
    touch_checkpoint(model)
    spec, reader = parts(model)
    assert pack_cache_dir(reader, torch.float32) != first  # a new fingerprint, a new folder
    tier = disk_tier(reader, spec, torch.float32, None)
    assert type(tier).__name__ == "PackTier"
    tier.close()


@pytest.mark.parametrize("damage", ["garbage", "field", "truncated"])
def test_a_corrupt_pack_is_refused(model, tmp_path, damage):
    spec, reader = parts(model)
    p = tmp_path / "p"
    write_pack(reader, spec, p)
    if damage == "garbage":
        (p / INDEX).write_text("{not json")
    elif damage == "field":
        data = json.loads((p / INDEX).read_text())
        data["stride"] = data["stride"] + 1
        (p / INDEX).write_text(json.dumps(data))
    else:
        with open(p / "layer_001.bin", "r+b") as f:
            f.truncate(100)
    with pytest.raises(PackError, match="corrupt"):
        open_pack(p, reader, spec)
    with pytest.raises(MoeRtError, match="corrupt"):
        LLM(model, dtype="float32", device="cpu", progress=False,
            cache=dict(offload="disk", capacity_slots=2, pack_dir=str(p)))


def test_greedy_output_with_packs_equals_all_resident(model, tmp_path):
    from moe_rt_app.cli.main import main

    ref = [o.outputs[0].token_ids for o in
           LLM(model, dtype="float32", device="cpu", progress=False).generate(PROMPTS, PARAMS)]
    assert main(["pack-experts", "--model", model, "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    for cache in (dict(offload="disk", capacity_slots=2, pack_dir=str(tmp_path / "p")),
                  dict(offload="disk", capacity_slots=3, policy="predictive", predictor="gate_lookahead",
                       prefetch_switch="on"),
                  dict(offload="disk", capacity_slots=2, auto_pack=False)):
        llm = LLM(model, dtype="float32", device="cpu", progress=False, cache=cache)
        try:
            out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]
            tier = type(llm.expert_cache.tier).__name__
        finally:
            llm.expert_cache.close()
        assert out == ref
        assert tier == ("DiskTier" if cache.get("auto_pack") is False else "PackTier")


def test_pack_dir_needs_the_disk_tier():
    from expert_cache.config import load_cache_config

    with pytest.raises(MoeRtError, match="pack_dir.*offload: disk"):
        load_cache_config(dict(offload="cpu", capacity_slots=2, pack_dir="/x"))


def test_reads_land_straight_in_aligned_slots_and_through_a_buffer_otherwise(model, tmp_path, monkeypatch):
    from expert_cache.packs import PackTier, aligned_empty

    spec, reader = parts(model)
    write_pack(reader, spec, tmp_path / "p")
    tier = open_pack(tmp_path / "p", reader, spec)
    D, I = spec.hidden_size, spec.moe.intermediate_size
    bounced = []
    orig = PackTier._buffer
    monkeypatch.setattr(PackTier, "_buffer", lambda self: bounced.append(1) or orig(self))
    slots13, slots2 = aligned_empty((2, 2 * I, D), torch.float32), aligned_empty((2, D, I), torch.float32)
    assert slots13.data_ptr() % ALIGN == 0
    tier.read_into((1, 3), slots13[1], slots2[1])  # 2I x D x 4 bytes: an aligned size
    assert bounced == []
    raw13 = torch.empty(2 * I * D + 1)[1:].view(2 * I, D)  # 4 bytes off any alignment
    raw2 = torch.empty(D * I)[:].view(D, I)
    tier.read_into((1, 3), raw13, raw2)
    assert bounced == [1]
    a, b = reader.read_expert(spec, 1, 3)
    for w13, w2 in ((slots13[1], slots2[1]), (raw13, raw2)):
        assert torch.equal(w13, a) and torch.equal(w2, b)
    tier.close()

import numpy as np
import pytest
import torch

from moe_rt.errors import MoeRtError
from moe_rt.layers.moe.events import BatchInfo, RouterEvent, RoutingHub
from router_predict.recorder import TraceRecorder
from router_predict.trace import TraceMeta

META = TraceMeta(num_experts=4, top_k=2, layer_ids=(1, 3), model="tiny")


def emit_step(hub, step, seq_ids, layer_ids=(1, 3), h=3):
    t = len(seq_ids)
    batch = BatchInfo(step, torch.tensor(seq_ids), torch.arange(t) + step, torch.arange(t) + 100 * step)
    for moe_index, layer_id in enumerate(layer_ids):
        ids = torch.tensor([[(moe_index + r) % 4, (moe_index + r + 1) % 4] for r in range(t)])
        hub.observe(RouterEvent(moe_index, layer_id, torch.full((t, h), float(step + moe_index)),
                                torch.zeros(t, 4), ids, torch.full((t, 2), 0.5), batch))


def test_assembles_rows_per_step_in_order():
    hub = RoutingHub()
    rec = TraceRecorder(hub, num_layers=2, with_hidden=True)
    rec.start()
    emit_step(hub, 0, [5, 6])
    emit_step(hub, 1, [5])
    rec.stop()
    emit_step(hub, 2, [7])  # after stop: not recorded
    t = rec.to_trace(META)
    assert t.steps.tolist() == [0, 0, 1] and t.seq_ids.tolist() == [5, 6, 5]
    assert t.positions.tolist() == [0, 1, 1] and t.token_ids.tolist() == [0, 1, 100]
    assert t.topk_ids[:, 1].tolist() == [[1, 2], [2, 3], [1, 2]]
    assert t.topk_ids.dtype == np.int32 and t.hidden.dtype == np.float16
    assert t.hidden[2, :, 0].tolist() == [1.0, 2.0]
    assert not hub.active


def test_without_hidden_and_errors():
    hub = RoutingHub()
    rec = TraceRecorder(hub, num_layers=2)
    rec.start()
    emit_step(hub, 0, [1])
    assert rec.to_trace(META).hidden is None
    with pytest.raises(MoeRtError, match="differ from the recorded"):
        rec.to_trace(TraceMeta(4, 2, (0, 1), "tiny"))
    emit_step(hub, 1, [1], layer_ids=(1,))  # layer 2 never routed
    with pytest.raises(MoeRtError, match=r"step 1 has no router event for MoE layer\(s\) \[1\]"):
        emit_step(hub, 2, [1])
    with pytest.raises(MoeRtError, match="saw no router events"):
        TraceRecorder(RoutingHub(), 2).to_trace(META)

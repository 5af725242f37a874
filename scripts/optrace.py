"""The aten event tree, in call order, of one region of one decode engine step: a layer's attention,
MLP / MoE block or glue, or what runs outside the layers. Usage: optrace.py CHECKPOINT_DIR BATCH
[attention|mlp|layer|outside] [LAYER] (fp32, one thread; LAYER counts from 0, default 0: the layer
that also builds the step's shared decode metadata)."""
import sys, torch
from moe_rt_app.llm import LLM
from moe_rt_app.bench import profile as P
from moe_rt import SamplingParams
import moe_rt_app.bench.decode as D
torch.set_num_threads(1)
path = sys.argv[1]; B = int(sys.argv[2]); want = sys.argv[3] if len(sys.argv) > 3 else "attention"
which = int(sys.argv[4]) if len(sys.argv) > 4 else 0  # the layer (in order of appearance) to print
llm = LLM(path, dtype="float32", progress=False, max_num_seqs=max(B, 1))
eng = llm.engine
rids = [eng.add_request([5 + i + j for j in range(32)], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)) for i in range(B)]
D.run_prefills(eng, rids)
eng.step(); eng.step()
with P._mark_layers(llm.model), torch.profiler.profile() as prof:
    eng.step()
evs = sorted((e for e in prof.events() if e.name.startswith("aten::") and P._region(e) == want), key=lambda e: e.time_range.start)
def depth(e):
    d, p = 0, e.cpu_parent
    while p is not None and p.name.startswith("aten::"):
        d += 1; p = p.cpu_parent
    return d
layers = []
for e in evs:
    # first layer only: stop when a second region instance starts (top-level op after a gap in layer ranges)
    p = e.cpu_parent
    while p is not None and not p.name.startswith("moe_rt::layer"):
        p = p.cpu_parent
    if want != "outside":
        lid = p.id if p else None
        if lid not in layers: layers.append(lid)
        if layers.index(lid) != which: continue
    print("  " * depth(e) + e.name, e.input_shapes if depth(e) == 0 else "")

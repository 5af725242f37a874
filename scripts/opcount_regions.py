"""aten ops of one decode engine step per region (attention, MLP / MoE block, the rest of the layer,
outside the layers), per layer, with the most frequent ops: the counts `bench decode --profile`
makes, broken down by op name. Usage: opcount_regions.py CHECKPOINT_DIR BATCH (fp32, two threads)."""
import sys, torch
from collections import Counter
from moe_rt_app.llm import LLM
from moe_rt_app.bench import profile as P
from moe_rt import SamplingParams
import moe_rt_app.bench.decode as D
torch.set_num_threads(2)
path = sys.argv[1]; B = int(sys.argv[2])
llm = LLM(path, dtype="float32", progress=False, max_num_seqs=max(B,1))
eng = llm.engine
prompts = [[5+i+j for j in range(32)] for i in range(B)]
params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
rids = [eng.add_request(p, params) for p in prompts]
D.run_prefills(eng, rids)
eng.step(); eng.step()
with P._mark_layers(llm.model), torch.profiler.profile() as prof:
    eng.step()
c = {"attention": Counter(), "mlp": Counter(), "layer": Counter(), "outside": Counter()}
top = {"attention": Counter(), "mlp": Counter(), "layer": Counter(), "outside": Counter()}
for ev in prof.events():
    if not ev.name.startswith("aten::"): continue
    r = P._region(ev); c[r][ev.name] += 1
    if not P._aten_parent(ev): top[r][ev.name] += 1
L = llm.model.spec.num_layers
for r in c:
    n = L if r != "outside" else 1
    print(r, sum(c[r].values())/n, "top-level", sum(top[r].values())/n)
    print("   ", {k: v/n for k, v in c[r].most_common(30)})
    print("  top", {k: v/n for k, v in top[r].most_common(30)})

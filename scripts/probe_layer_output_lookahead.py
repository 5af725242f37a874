"""Probe: how well does layer l+1's router, applied to layer l's *output* (the residual stream after
its MoE), forecast layer l+1's experts, next to the gate look-ahead we ship (applied to layer l's
router input)? Prefill tokens of the first 32 held-out prompts, demo model, recall@2 per layer pair.

    .venv/bin/python scripts/probe_layer_output_lookahead.py

This variant predicts later (after layer l's experts ran, so a prefetch only overlaps layer l+1's
attention). The probe led to the `gate_lookahead_output` predictor (router_predict/predictors/
gate_lookahead_output.py), measured with the full eval in docs/benchmarks-router-predict.md.
"""
import torch

from moe_rt_app import LLM


def main() -> None:
    torch.set_num_threads(1)
    llm = LLM(progress=False, dtype="float32")
    model = llm.model
    prompts = [line.strip() for line in open("data/prompts/kjv-heldout.txt")][:32]
    outs: dict[int, list] = {}
    routes: dict[int, list] = {}
    router_in: dict[int, list] = {}
    hooks = [layer.register_forward_hook(lambda mod, a, o, i=i: outs.setdefault(i, []).append(o.detach()))
             for i, layer in enumerate(model.layers)]
    off = model.hub.subscribe(lambda e: (routes.setdefault(e.moe_index, []).append(e.topk_ids),
                                         router_in.setdefault(e.moe_index, []).append(e.hidden)))
    try:
        for p in prompts:
            llm.prompt_logits(llm.tokenizer.encode(p))
    finally:
        off()
        for h in hooks:
            h.remove()
    blocks = model.moe_blocks()  # the demo model: every layer is an MoE layer
    means = {"router input of l (shipped)": [], "output of l": []}
    for l in range(len(model.layers) - 1):
        true = torch.cat(routes[l + 1])
        nxt = model.layers[l + 1]
        for name, h in [("router input of l (shipped)", torch.cat(router_in[l])),
                        ("output of l", nxt.post_attention_layernorm(torch.cat(outs[l])))]:
            pred = (h @ blocks[l + 1].gate.weight.t()).topk(2).indices
            recall = (pred[:, :, None] == true[:, None, :]).any(1).float().mean().item()
            means[name].append(recall)
            print(f"layer {l} -> {l + 1}  {name:<28} recall@2 {recall:.3f}")
    for name, v in means.items():
        print(f"mean  {name:<28} {sum(v) / len(v):.3f}")


if __name__ == "__main__":
    with torch.no_grad():
        main()

"""compile=True: compile the decode graphs before the first request, as a server must.

Why: dynamo compiles a graph the first time a step of a new shape arrives, seconds of C++ each
(mixtral-56m cold: ~14 s for the one-token graph, ~6 s for each of the others). Left to the
requests, the first one waits for that, and every running stream stalls again the first time the
batch grows to 2 sequences, and again past ROW_REDUCTION_MAX_ROWS. warm_up decodes a few tokens
at one batch size per graph (CompiledDecode.warm_batches), then leaves the engine as it found it:
no request, every KV block free, the step count and the sampler's generator as before. The graphs
stay in the process (and in inductor's on-disk cache, so a restart compiles faster).

It runs only where the compiled graphs will: compile=True and the conditions of
CompiledDecode.applies (float32 or bfloat16 on the CPU, experts resident, no observers). An engine
whose steps stay eager (an expert cache installed, a routing observer) is left untouched, since its
steps would count as cache traffic and predictor samples.
"""
from __future__ import annotations

from tqdm import tqdm

from moe_rt.errors import MoeRtError
from moe_rt.sampling_params import SamplingParams

PROMPT_TOKENS = 4  # a few keys: dynamo would specialise a key count of 1
NEW_TOKENS = 3  # two decode steps at each batch size


def warm_batches(engine) -> list[int]:
    """The decode batch sizes warm_up steps through for `engine` (empty: nothing to compile)."""
    compiled = engine.model.compiled_decode
    if compiled is None or not compiled.applies():
        return []
    return compiled.warm_batches(engine.scheduler.max_num_seqs)


def warm_up(engine, *, progress: bool = True) -> list[int]:
    """Decode a few greedy tokens at each of warm_batches(engine), so every graph compile=True
    will take is compiled now; returns those batch sizes. The engine must hold no request."""
    batches = warm_batches(engine)
    if not batches:
        return []
    if engine.has_unfinished():
        raise MoeRtError("warm_up runs before any request is added: the engine holds requests")
    steps, rng = engine.num_steps, engine.generator.get_state()
    length = max(1, min(PROMPT_TOKENS, engine.max_model_len - NEW_TOKENS))
    prompt = [t % engine.vocab_size for t in range(1, length + 1)]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    try:
        for b in tqdm(batches, desc="compiling decode graphs", unit="batch size", disable=not progress):
            for i in range(b):
                engine.add_request(prompt, params, request_id=f"warm-up-{b}-{i}")
            while engine.has_unfinished():
                engine.step()
    finally:
        for rid in list(engine.requests):  # only after a failure: a finished request has left
            engine.abort(rid)
        engine.num_steps, engine.last_batch_size = steps, 0
        engine.generator.set_state(rng)
    return batches

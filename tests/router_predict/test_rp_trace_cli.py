"""`moe-rt trace` end to end on the tiny Mixtral, and record_trace on a live engine."""
import argparse
import json

import numpy as np
import pytest
import torch

from moe_rt_app.cli.main import main
from moe_rt.errors import MoeRtError
from moe_rt.sampling_params import SamplingParams
from moe_rt_app.cli import trace as cli_trace
from router_predict.trace import load_trace

PROMPTS = ["In the beginning God created", "And God said", "Hello world, the quick brown fox"]
MAX_TOKENS = 4


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli_trace.add_arguments(parser)
    return cli_trace.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def greedy_lengths(mixtral_llm):
    """(prompt token counts, generated token counts) per prompt, from an independent generate() call."""
    outs = mixtral_llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return [len(o.prompt_token_ids) for o in outs], [len(o.token_ids) for o in outs]


@pytest.fixture(scope="module")
def cli_trace_file(mixtral_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trace_cli")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is skipped
    out = folder / "t.npz"
    assert run_cli(["--model", str(mixtral_dir), "--prompts", str(prompts), "--max-tokens", str(MAX_TOKENS),
                    "--out", str(out), "--with-hidden", "--max-num-seqs", "2", "--dtype", "float32",
                    "--device", "cpu"]) == 0
    return out


def test_rows_are_forwarded_tokens(cli_trace_file, greedy_lengths, mixtral_dir):
    trace = load_trace(cli_trace_file)
    prompt_lens, gen_lens = greedy_lengths
    # Each sequence forwards its prompt, then every generated token but the last.
    assert trace.num_rows == sum(prompt_lens) + sum(gen_lens) - len(PROMPTS)
    seqs = list(dict.fromkeys(trace.seq_ids.tolist()))  # first-seen order = admission order
    assert len(seqs) == len(PROMPTS)
    for seq, p, g in zip(seqs, prompt_lens, gen_lens):
        pos = trace.positions[trace.seq_ids == seq]
        assert pos.tolist() == list(range(p + g - 1))  # once each, in order: no preemption here
    m = trace.meta
    assert (m.num_experts, m.top_k, m.layer_ids, m.model) == (8, 2, (0, 1), str(mixtral_dir))
    assert m.extra["generated_tokens"] == sum(gen_lens) and m.extra["prompt_tokens"] == sum(prompt_lens)


def test_steps_follow_continuous_batching(cli_trace_file, mixtral_llm):
    trace = load_trace(cli_trace_file)
    seqs = list(dict.fromkeys(trace.seq_ids.tolist()))
    by_step = {}
    for step, seq, pos in zip(trace.steps.tolist(), trace.seq_ids.tolist(), trace.positions.tolist()):
        by_step.setdefault(step, []).append((seq, pos))
    for rows in by_step.values():
        assert len({s for s, _ in rows}) <= 2  # --max-num-seqs 2
        if len(rows) > len({s for s, _ in rows}):  # a prefill step: whole prompts from position 0
            assert min(p for _, p in rows) == 0
    # The third request is admitted only after one of the first two finished, then decodes in
    # the same batches as the survivor.
    first_step = {s: int(trace.steps[trace.seq_ids == s].min()) for s in seqs}
    last_step = {s: int(trace.steps[trace.seq_ids == s].max()) for s in seqs}
    assert first_step[seqs[2]] > first_step[seqs[0]] == first_step[seqs[1]]
    assert first_step[seqs[2]] > min(last_step[seqs[0]], last_step[seqs[1]])
    # Prefill rows carry the prompt's tokens.
    first = trace.token_ids[trace.seq_ids == seqs[0]][: len(mixtral_llm.tokenizer.encode(PROMPTS[0]))]
    assert first.tolist() == mixtral_llm.tokenizer.encode(PROMPTS[0])


def test_with_hidden_is_the_router_input(cli_trace_file, mixtral_llm):
    trace = load_trace(cli_trace_file)
    assert trace.hidden.shape == (trace.num_rows, 2, 64) and trace.hidden.dtype == np.float16
    blocks = mixtral_llm.model.moe_blocks()
    agree = 0
    for layer, block in enumerate(blocks):
        logits = torch.from_numpy(trace.hidden[:, layer]).float() @ block.gate.weight.float().T
        top = logits.topk(2, dim=-1).indices.sort(-1).values
        agree += int((top == torch.from_numpy(np.sort(trace.topk_ids[:, layer], -1)).long()).all(-1).sum())
    assert agree >= 0.95 * 2 * trace.num_rows  # float16 storage may flip a near-tie


def test_cli_main_with_jsonl_and_no_hidden(mixtral_dir, tmp_path, greedy_lengths):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(PROMPTS)))
    out = tmp_path / "t.npz"
    assert main(["trace", "--model", str(mixtral_dir), "--prompts", str(prompts), "--max-tokens",
                 str(MAX_TOKENS), "--out", str(out), "--dtype", "float32", "--device", "cpu"]) == 0
    trace = load_trace(out)
    assert trace.hidden is None
    assert trace.num_rows == sum(greedy_lengths[0]) + sum(greedy_lengths[1]) - len(PROMPTS)
    assert len(set(trace.steps.tolist())) == MAX_TOKENS  # all three prefill together, then decode


@pytest.mark.parametrize("content, name, message", [
    (None, "missing.txt", "no such file"),
    ("\n  \n", "empty.txt", "is empty"),
    ('{"text": "no prompt field"}\n', "bad.jsonl", "needs a non-empty string field 'prompt'"),
    ("not json\n", "bad.jsonl", "not valid JSON"),
])
def test_bad_prompts_file_exits_2(tmp_path, capsys, content, name, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    # The prompts are read before any model is loaded, so no --model is needed to fail.
    assert main(["trace", "--prompts", str(path), "--out", str(tmp_path / "t.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_read_prompts_detects_jsonl_by_content(tmp_path):
    as_json = tmp_path / "a.txt"
    as_json.write_text('{"prompt": "x y"}\n{"prompt": "z"}\n')
    assert cli_trace.read_prompts(str(as_json)) == ["x y", "z"]
    mixed = tmp_path / "b.txt"
    mixed.write_text("{not json}\nplain line\n")
    assert cli_trace.read_prompts(str(mixed)) == ["{not json}", "plain line"]


def test_record_trace_leaves_engine_clean(mixtral_llm):
    engine = mixtral_llm.engine
    before = set(engine.requests)
    trace = cli_trace.record_trace(mixtral_llm, PROMPTS[:2], SamplingParams(max_tokens=2, temperature=0))
    assert set(engine.requests) == before and not mixtral_llm.model.hub.active
    assert len(set(trace.seq_ids.tolist())) == 2 and trace.hidden is None
    with pytest.raises(MoeRtError, match="at least one prompt"):
        cli_trace.record_trace(mixtral_llm, [], SamplingParams())


def test_eval_predictor_reads_routers_from_the_folder_the_trace_names(cli_trace_file, mixtral_dir, capsys):
    # gate_lookahead needs router weights; a trace recorded by `moe-rt trace` names its model
    # folder, so --model may be left out and gives the same figures as passing that folder.
    base = ["eval-predictor", "--trace", str(cli_trace_file), "--predictor", "gate_lookahead", "--json"]
    assert main(base) == 0
    implicit = json.loads(capsys.readouterr().out)
    assert main(base + ["--model", str(mixtral_dir)]) == 0
    explicit = json.loads(capsys.readouterr().out)
    scores = [{k: v for k, v in p.items() if k != "cost_us_per_token"} for p in (implicit["predictors"][0], explicit["predictors"][0])]
    assert scores[0] == scores[1]
    assert implicit["predictors"][0]["by_distance"]["1"]["recall"] > 0

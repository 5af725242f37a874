"""JSON mode's guide: the byte automaton against json.loads, then token by token on real tokenizers."""
from __future__ import annotations

import json
import random
from collections import deque
from pathlib import Path

import pytest

import moe_rt
from moe_rt.engine.json_guide import (MAX_DEPTH, MAX_WS_RUN, START_STATE, JsonObjectGuide, feed, is_complete, step,
                                      token_bytes)
from moe_rt.tokenizer import Tokenizer

DEMO_DIR = Path(moe_rt.__file__).parent / "demo_model"
# Bytes that can finish any open state without opening a container, so the search below ends:
# closers, a digit for numbers and \u escapes, the letters of true/false/null, UTF-8 continuations.
FINISHERS = b'"}]0:1elrusafn\\\x80\x90\xa0'


def parse_object(s: str) -> bool:
    """Strict json.loads (no NaN/Infinity, which RFC 8259 lacks) giving a dict."""
    def no_constants(name):
        raise ValueError(name)

    try:
        return isinstance(json.loads(s, parse_constant=no_constants), dict)
    except ValueError:  # JSONDecodeError included
        return False


def completion(state) -> bytes | None:
    """Shortest bytes from FINISHERS that complete the object from state (breadth-first)."""
    seen, queue = {state}, deque([(state, b"")])
    while queue:
        s, suffix = queue.popleft()
        if is_complete(s):
            return suffix
        for b in FINISHERS + (b"{" if not s[0] else b""):  # '{' only to open the top level
            t = step(s, b)
            if t is not None and t not in seen:
                seen.add(t)
                queue.append((t, suffix + bytes([b])))
    return None


def random_text(rng: random.Random) -> str:
    pool = ["a", "b", "key", " ", '"', "\\", "/", "\n", "\t", "\x00", "\x1f", "\x7f", "é", "ß", "世界", "€",
            "😀", "𝄞", "\u2028", "\ufeff", "{", "}", "[", "]", ":", ","]
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 6)))


def random_number(rng: random.Random):
    return rng.choice([
        0, -0.0, rng.randint(-10**6, 10**6), rng.randint(-2**70, 2**70), rng.uniform(-1e3, 1e3),
        rng.uniform(-1, 1) * 10.0 ** rng.randint(-300, 300), 1e-7, 2.5e+21, -3.75e-12,
    ])


def random_value(rng: random.Random, depth: int):
    kind = rng.randrange(8 if depth < 6 else 5)
    if kind == 0:
        return random_text(rng)
    if kind == 1:
        return random_number(rng)
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4):
        return rng.randint(-5, 5)
    if kind in (5, 6):
        return random_object(rng, depth + 1)
    return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def random_object(rng: random.Random, depth: int = 0) -> dict:
    return {random_text(rng): random_value(rng, depth) for _ in range(rng.randint(0, 4))}


def random_document(rng: random.Random) -> str:
    style = rng.choice([{}, {"indent": 2}, {"separators": (",", ":")}, {"indent": "\t"}])
    text = json.dumps(random_object(rng), ensure_ascii=rng.random() < 0.5, **style)
    return rng.choice(["", " ", "\n", "\r\n\t"]) + text + rng.choice(["", " ", "\n  "])


def mutate(rng: random.Random, text: str) -> str:
    alphabet = list(' {}[]:,"\\/0123456789-+.eEtrufalsnu\x00\n\té😀') + ["true", "null", "1e", "\\u12", "-0"]
    for _ in range(rng.randint(1, 3)):
        i = rng.randint(0, len(text))
        op = rng.randrange(4)
        if op == 0:
            text = text[:i] + rng.choice(alphabet) + text[i:]
        elif op == 1:
            text = text[:i] + text[i + 1:]
        elif op == 2:
            text = text[:i] + rng.choice(alphabet) + text[i + 1:]
        else:
            text = text[:i]
    return text


# --- the automaton on text -----------------------------------------------------------------------


def test_every_prefix_of_valid_objects_is_accepted():
    rng = random.Random(0)
    for _ in range(300):
        data = random_document(rng).encode()
        state = START_STATE
        for i, b in enumerate(data):  # byte by byte, so prefixes end inside UTF-8 characters too
            state = step(state, b)
            assert state is not None, (data[: i + 1], data)
            assert is_complete(state) == (len(data[: i + 1].rstrip()) == len(data.rstrip()))
        assert is_complete(state), data


def test_complete_iff_json_loads_gives_a_dict_and_prefixes_can_be_completed():
    rng = random.Random(1)
    completes = refused = 0
    for n in range(3000):
        s = mutate(rng, random_document(rng)) if n % 4 else random_text(rng) + random_text(rng)
        state = feed(START_STATE, s.encode())
        assert is_complete(state) == parse_object(s), repr(s)
        completes += is_complete(state)
        refused += state is None
        # accepted means some completion exists: find one and let json.loads confirm it
        cut = s.encode()[: rng.randint(0, len(s.encode()))]
        for prefix in (s.encode(), cut):
            st = feed(START_STATE, prefix)
            if st is not None:
                suffix = completion(st)
                assert suffix is not None, prefix
                assert parse_object((prefix + suffix).decode()), prefix + suffix
    assert completes > 300 and refused > 1000  # the mutations exercise both sides


@pytest.mark.parametrize("text", ["[]", '"a"', "1", "-0", "true", "null", " []", "\n[{}]", "{}{}", "{} 1", "{},"])
def test_top_level_must_be_one_object(text):
    assert not is_complete(feed(START_STATE, text.encode()))
    assert not parse_object(text)


@pytest.mark.parametrize("text", ['{"a": NaN}', '{"a": Infinity}', '{"a": 01}', '{"a": 1.}', '{"a": .5}',
                                  '{"a": +1}', '{"a": 1e}', '{"a": "\\x"}', '{"a": "\\u12g4"}',
                                  '{"a": "\t"}', "{'a': 1}", '{"a" 1}', '{"a": 1,}', '{"a": [1,]}',
                                  '{"a": tru}', '{"a": truex}', '{a: 1}', '{"a": 1 2}'])
def test_grammar_errors_are_refused(text):
    assert feed(START_STATE, text.encode()) is None
    assert not parse_object(text)


@pytest.mark.parametrize("raw", [b"\x80", b"\xc0\x80", b"\xe0\x80\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                                 b"\xf5", b"\xc3\x28", b"\xe2\x82"])
def test_invalid_or_unfinished_utf8_cannot_close_a_string(raw):
    assert feed(START_STATE, b'{"a": "' + raw + b'"') is None


def test_nesting_limit():
    deepest = '{"a":' * (MAX_DEPTH - 1) + "{}" + "}" * (MAX_DEPTH - 1)
    assert is_complete(feed(START_STATE, deepest.encode())) and parse_object(deepest)
    arrays = '{"a":' + "[" * (MAX_DEPTH - 1)
    assert feed(START_STATE, arrays.encode()) is not None
    assert feed(START_STATE, (arrays + "[").encode()) is None
    assert feed(START_STATE, (arrays + '"deep"').encode()) is not None  # a scalar still fits


def test_whitespace_runs_are_capped():
    assert feed(START_STATE, b" " * MAX_WS_RUN + b"{") is not None
    assert feed(START_STATE, b" " * (MAX_WS_RUN + 1)) is None  # the model must begin the object
    text = b'{"a":' + b"\n" * MAX_WS_RUN + b"1" + b" " * MAX_WS_RUN + b"}" + b"\t" * MAX_WS_RUN
    assert is_complete(feed(START_STATE, text))
    assert feed(START_STATE, text + b" ") is None
    assert feed(START_STATE, b'{"a": [' + b"\n" * (MAX_WS_RUN + 1)) is None
    assert feed(START_STATE, b'{"a": "' + b" " * 1000) is not None  # inside a string it is text


# --- token by token ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_tok() -> Tokenizer:
    return Tokenizer(DEMO_DIR)


def ids_of(tok: Tokenizer, piece: str) -> int:
    ids = tok.encode(piece, add_special_tokens=False)
    assert len(ids) == 1, (piece, ids)
    return ids[0]


def test_token_bytes_match_the_decoder(demo_tok, tmp_path):
    from checkpoints import write_tokenizer

    write_tokenizer(tmp_path)
    rng = random.Random(2)
    for tok in (demo_tok, Tokenizer(tmp_path)):
        table = token_bytes(tok)
        assert token_bytes(tok) is table  # one cache per tokenizer
        for _ in range(50):
            text = random_document(rng)
            ids = tok.encode(text, add_special_tokens=False)
            assert b"".join(table(i) for i in ids).decode() == tok.decode(ids) == text
        assert table(tok.eos_token_id) is None and table(tok.bos_token_id) is None
        assert table(tok.vocab_size + 5) is None


def test_tokens_of_json_texts_are_all_allowed(demo_tok):
    rng = random.Random(3)
    eos = {demo_tok.eos_token_id}
    for _ in range(40):
        text = random_document(rng)
        ids = demo_tok.encode(text, add_special_tokens=False)
        guide = JsonObjectGuide(demo_tok, eos)
        for n, t in enumerate(ids):
            # EOS exactly once the object is closed (trailing whitespace may follow)
            assert guide.allows(demo_tok.eos_token_id) == guide.complete == parse_object(demo_tok.decode(ids[:n]))
            assert guide.allows(t)
            guide.advance(t)
        assert guide.complete and guide.allows(demo_tok.eos_token_id)
        guide.advance(demo_tok.eos_token_id)
        assert not guide.allows(ids_of(demo_tok, " "))  # nothing after EOS


def test_tokens_breaking_the_grammar_are_refused(demo_tok):
    guide = JsonObjectGuide(demo_tok, {demo_tok.eos_token_id})
    assert not guide.allows(ids_of(demo_tok, "["))  # the top level is an object
    assert not guide.allows(ids_of(demo_tok, " the"))
    assert guide.allows(ids_of(demo_tok, " "))
    for t in demo_tok.encode('{"a": 1', add_special_tokens=False):
        guide.advance(t)
    assert guide.allows(ids_of(demo_tok, "0")) and guide.allows(ids_of(demo_tok, "}"))
    assert not guide.allows(ids_of(demo_tok, "]"))
    assert not guide.allows(ids_of(demo_tok, "x"))
    assert not guide.allows(ids_of(demo_tok, "\""))
    assert not guide.allows(demo_tok.eos_token_id)
    guide.advance(ids_of(demo_tok, "}"))
    assert guide.complete and guide.allows(demo_tok.eos_token_id)
    assert not guide.allows(ids_of(demo_tok, "}"))
    with pytest.raises(ValueError):
        guide.advance(ids_of(demo_tok, "x"))


def test_special_tokens_are_refused_even_inside_strings(demo_tok):
    guide = JsonObjectGuide(demo_tok, {demo_tok.eos_token_id})
    for t in demo_tok.encode('{"text": "', add_special_tokens=False):
        guide.advance(t)
    assert guide.allows(ids_of(demo_tok, " the"))
    for special in (demo_tok.bos_token_id, demo_tok.eos_token_id, 2):  # <s>, </s>, <pad>
        assert not guide.allows(special)


def test_partial_utf8_tokens_only_inside_strings(demo_tok):
    # The demo vocab has single-byte tokens; 'Ã' is the byte 0xC3, the lead of a 2-byte character.
    table = token_bytes(demo_tok)
    lead = next(i for i in range(demo_tok.vocab_size) if table(i) == b"\xc3")
    cont = next(i for i in range(demo_tok.vocab_size) if table(i) == b"\xa9")
    guide = JsonObjectGuide(demo_tok, {demo_tok.eos_token_id})
    for t in demo_tok.encode('{"k": ', add_special_tokens=False):
        guide.advance(t)
    assert not guide.allows(lead) and not guide.allows(cont)  # outside a string
    guide.advance(ids_of(demo_tok, '"'))
    assert guide.allows(lead) and not guide.allows(cont)  # a continuation byte cannot start a character
    guide.advance(lead)
    assert not guide.allows(ids_of(demo_tok, '"'))  # the character must be finished first
    assert not guide.allows(lead)
    guide.advance(cont)
    for t in demo_tok.encode('"}', add_special_tokens=False):
        guide.advance(t)
    assert guide.complete


def write_sentencepiece_style(folder: Path) -> Tokenizer:
    """A Llama-style tokenizer: Metaspace pieces ("▁the"), byte-fallback tokens <0xNN> for anything
    outside its small vocab, and a decoder that drops the space in front of the first word."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    specials = ["<unk>", "<s>", "</s>"]
    pieces = [*specials, *(f"<0x{b:02X}>" for b in range(256)), "▁", *map(chr, range(0x21, 0x7F))]
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ('"', ":"), ("n", "u"), ("nu", "l"), ("nul", "l")]
    pieces += [a + b for a, b in merges]
    tok = HFTokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, byte_fallback=True,
                                 unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return Tokenizer(folder)


def test_sentencepiece_style_tokenizer(tmp_path):
    tok = write_sentencepiece_style(tmp_path)
    table = token_bytes(tok)
    eos = {tok.eos_token_id}
    text = '{"name": "vàlue 😀", "list": [1, 2.5, true, null], "x": {"y": "see the fox"}}'
    ids = tok.encode(text, add_special_tokens=False)
    assert {"▁the", '":', "null", "<0xC3>", "<0xF0>"} <= {tok.id_to_token(i) for i in ids}
    # the guide sees the leading space decode drops at the start of a text: whitespace before '{'
    assert b"".join(table(i) for i in ids).decode() == " " + text == " " + tok.decode(ids)
    guide = JsonObjectGuide(tok, eos)
    for t in ids:
        assert guide.allows(t) and not guide.allows(tok.eos_token_id)
        guide.advance(t)
    assert guide.complete and guide.allows(tok.eos_token_id)
    f0 = next(i for i in range(tok.vocab_size) if tok.id_to_token(i) == "<0xF0>")
    guide = JsonObjectGuide(tok, eos)
    guide.advance(ids[0])
    assert not guide.allows(f0)  # outside a string
    for t in tok.encode('{"a": "', add_special_tokens=False)[1:]:
        guide.advance(t)
    assert guide.allows(f0)


# --- with the engine -----------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_in_json_mode_gives_an_object_when_it_stops():
    from moe_rt_app import LLM, SamplingParams

    engine = [p for p in (Path(moe_rt.__file__).parent / "engine").glob("*.py") if p.name != "json_guide.py"]
    if not any("JsonObjectGuide" in p.read_text() for p in engine):
        pytest.skip("the engine does not use JsonObjectGuide yet")
    params = [SamplingParams(response_format="json_object", max_tokens=160, temperature=t, seed=s)
              for t, s in [(0.0, None), (1.0, 1)]]
    with LLM(DEMO_DIR, dtype="float32", device="cpu", progress=False) as llm:
        outs = llm.generate(["Reply in JSON: the name of the first man."] * len(params), params)
    for out in outs:
        c = out.outputs[0]
        assert feed(START_STATE, c.text.encode()) is not None, c.text  # a valid prefix whatever the reason
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict), c.text
        else:
            assert c.finish_reason == "length"
    # The demo model knows no JSON: left alone it emits whitespace; the whitespace cap makes it open
    # the object, and the engine ends it once closed. So the checks above are not vacuous.
    assert any(out.outputs[0].finish_reason == "stop" for out in outs)

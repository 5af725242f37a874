"""Constrained decoding for `response_format: {"type": "json_object"}`: a guide that says, token by
token, whether the output so far is still a prefix of exactly one JSON object (RFC 8259; the top
level must be `{...}`), optionally surrounded by whitespace.

The grammar runs on bytes, not characters: a byte-level BPE token may end inside a multi-byte UTF-8
character, and that is fine exactly when later tokens can finish the character inside a string.
Outside strings JSON is ASCII, so a byte >= 0x80 there is refused at once.

Terms. A *state* is an immutable tuple `(stack, mode, aux)`:
  stack  one letter per open container, innermost last: "k" an object before the colon of its
         current member (expecting a key, or inside one), "v" an object after that colon, "a" an
         array. Its length is the nesting depth, at most MAX_DEPTH.
  mode   what the next byte may be (the constants below).
  aux    what the mode needs to remember: the rest of a literal (b"rue"), hex digits left in a
         \\uXXXX escape, (continuation bytes left, lowest, highest allowed next byte) in UTF-8, and
         between tokens of the grammar the length of the current whitespace run (None when 0).
`step(state, byte)` gives the next state, or None when no JSON object starts with the bytes so far.
Since states are immutable, trying a token has nothing to undo: allows() walks the token's bytes
from the current state and advance() keeps the result.
"""
from __future__ import annotations

import json
import re

# Nesting limit, counting the top-level object as 1. Deeper containers are refused, so a model that
# keeps opening brackets is steered to close them instead of running away.
MAX_DEPTH = 64
# Longest run of whitespace between tokens of the grammar (and before or after the object): room for
# a newline and the indentation of depth 16 at 4 spaces. Without it a model unsure how to begin (or
# go on) can emit whitespace until max_tokens, a failure OpenAI's JSON mode documents.
MAX_WS_RUN = 65

WS = frozenset(b" \t\n\r")
DIGITS = frozenset(b"0123456789")
HEX = frozenset(b"0123456789abcdefABCDEF")
ESCAPES = frozenset(b'"\\/bfnrt')
LITERALS = {ord("t"): b"rue", ord("f"): b"alse", ord("n"): b"ull"}
QUOTE, BACKSLASH, COMMA, COLON_CH = ord('"'), ord("\\"), ord(","), ord(":")
LBRACE, RBRACE, LBRACKET, RBRACKET = ord("{"), ord("}"), ord("["), ord("]")
MINUS, PLUS, ZERO, DOT = ord("-"), ord("+"), ord("0"), ord(".")

# modes
START = 0  # before the top-level '{'
DONE = 1  # after the top-level '}': only whitespace may follow
OBJ_FIRST = 2  # after '{': a key or '}'
OBJ_KEY = 3  # after ',' in an object: a key
COLON = 4  # after a key: ':'
VALUE = 5  # after ':' or after ',' in an array: a value
ARR_FIRST = 6  # after '[': a value or ']'
AFTER_VALUE = 7  # after a value inside a container: ',' or the container's closer
STRING = 8  # inside a string (a key if the stack top is "k")
ESCAPE = 9  # after a backslash in a string
HEX_DIGITS = 10  # in \uXXXX; aux = digits left
UTF8 = 11  # inside a multi-byte character; aux = (continuations left, lo, hi)
LITERAL = 12  # in true/false/null; aux = the bytes still expected
NUM_MINUS = 13  # after '-': a digit
NUM_ZERO = 14  # a leading 0: no more integer digits
NUM_INT = 15  # integer digits
NUM_DOT = 16  # after '.': a digit
NUM_FRAC = 17  # fraction digits
NUM_EXP = 18  # after 'e': a sign or a digit
NUM_EXP_SIGN = 19  # after 'e+' / 'e-': a digit
NUM_EXP_DIGITS = 20  # exponent digits
NUMBER_MAY_END = frozenset({NUM_ZERO, NUM_INT, NUM_FRAC, NUM_EXP_DIGITS})

State = tuple  # (stack: str, mode: int, aux)
START_STATE: State = ("", START, None)


def _utf8_lead(stack: str, b: int) -> State | None:
    """A byte >= 0x80 starting a character in a string. The ranges of the first continuation byte
    exclude overlong forms, UTF-16 surrogates and code points above U+10FFFF (RFC 3629)."""
    if 0xC2 <= b <= 0xDF:
        return (stack, UTF8, (1, 0x80, 0xBF))
    if 0xE0 <= b <= 0xEF:
        lo, hi = (0xA0, 0xBF) if b == 0xE0 else (0x80, 0x9F) if b == 0xED else (0x80, 0xBF)
        return (stack, UTF8, (2, lo, hi))
    if 0xF0 <= b <= 0xF4:
        lo, hi = (0x90, 0xBF) if b == 0xF0 else (0x80, 0x8F) if b == 0xF4 else (0x80, 0xBF)
        return (stack, UTF8, (3, lo, hi))
    return None  # a stray continuation byte, C0/C1, or F5..FF


def _value(stack: str, b: int) -> State | None:
    """The first byte of a value."""
    if b == QUOTE:
        return (stack, STRING, None)
    if b == LBRACE or b == LBRACKET:
        if len(stack) >= MAX_DEPTH:
            return None
        return (stack + "k", OBJ_FIRST, None) if b == LBRACE else (stack + "a", ARR_FIRST, None)
    if b == MINUS:
        return (stack, NUM_MINUS, None)
    if b == ZERO:
        return (stack, NUM_ZERO, None)
    if b in DIGITS:
        return (stack, NUM_INT, None)
    if b in LITERALS:
        return (stack, LITERAL, LITERALS[b])
    return None


def _close(stack: str) -> State:
    """Pop a finished container. Its parent is "v" or "a" (a container is never a key)."""
    stack = stack[:-1]
    return (stack, AFTER_VALUE, None) if stack else ("", DONE, None)


def step(state: State, b: int) -> State | None:
    """The state after byte b, or None if no JSON object starts with the bytes so far."""
    stack, mode, aux = state
    if mode == STRING:  # the common case first
        if b == QUOTE:
            return (stack, COLON if stack[-1] == "k" else AFTER_VALUE, None)
        if b == BACKSLASH:
            return (stack, ESCAPE, None)
        if 0x20 <= b < 0x80:
            return state
        return _utf8_lead(stack, b) if b >= 0x80 else None  # raw control characters are not allowed
    if mode == UTF8:
        left, lo, hi = aux
        if not lo <= b <= hi:
            return None
        return (stack, STRING, None) if left == 1 else (stack, UTF8, (left - 1, 0x80, 0xBF))
    if mode >= NUM_MINUS:
        if mode == NUM_MINUS:
            return (stack, NUM_ZERO if b == ZERO else NUM_INT, None) if b in DIGITS else None
        if mode == NUM_DOT:
            return (stack, NUM_FRAC, None) if b in DIGITS else None
        if mode == NUM_EXP:
            if b == PLUS or b == MINUS:
                return (stack, NUM_EXP_SIGN, None)
            return (stack, NUM_EXP_DIGITS, None) if b in DIGITS else None
        if mode == NUM_EXP_SIGN:
            return (stack, NUM_EXP_DIGITS, None) if b in DIGITS else None
        if b in DIGITS and mode != NUM_ZERO:
            return state
        if b == DOT and mode in (NUM_ZERO, NUM_INT):
            return (stack, NUM_DOT, None)
        if (b == 0x65 or b == 0x45) and mode != NUM_EXP_DIGITS:  # e / E
            return (stack, NUM_EXP, None)
        # A number has no closing byte: it ends at the first byte that cannot continue it, which
        # then counts as the byte after the value.
        return step((stack, AFTER_VALUE, None), b)
    if b in WS and mode not in (ESCAPE, HEX_DIGITS, LITERAL):
        run = aux or 0
        return (stack, mode, run + 1) if run < MAX_WS_RUN else None
    if mode == AFTER_VALUE:
        top = stack[-1]
        if b == COMMA:
            return (stack[:-1] + "k", OBJ_KEY, None) if top == "v" else (stack, VALUE, None)
        if (b == RBRACE and top == "v") or (b == RBRACKET and top == "a"):
            return _close(stack)
        return None
    if mode == VALUE:
        return _value(stack, b)
    if mode == OBJ_FIRST or mode == OBJ_KEY:
        if b == QUOTE:
            return (stack, STRING, None)
        return _close(stack) if b == RBRACE and mode == OBJ_FIRST else None
    if mode == COLON:
        return (stack[:-1] + "v", VALUE, None) if b == COLON_CH else None
    if mode == ARR_FIRST:
        return _close(stack) if b == RBRACKET else _value(stack, b)
    if mode == ESCAPE:
        if b == 0x75:  # u
            return (stack, HEX_DIGITS, 4)
        return (stack, STRING, None) if b in ESCAPES else None
    if mode == HEX_DIGITS:
        if b not in HEX:
            return None
        return (stack, STRING, None) if aux == 1 else (stack, HEX_DIGITS, aux - 1)
    if mode == LITERAL:
        if b != aux[0]:
            return None
        return (stack, LITERAL, aux[1:]) if len(aux) > 1 else (stack, AFTER_VALUE, None)
    if mode == START:
        return ("k", OBJ_FIRST, None) if b == LBRACE else None
    return None  # DONE: only whitespace, handled above


def feed(state: State | None, data: bytes) -> State | None:
    """The state after all of data (None as soon as one byte is refused)."""
    for b in data:
        if state is None:
            return None
        state = step(state, b)
    return state


def is_complete(state: State | None) -> bool:
    return state is not None and state[1] == DONE


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character each byte is written as in the vocab."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {chr(b): b for b in keep}
    n = 0
    for b in range(256):
        if b not in keep:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _decoder_types(spec: dict | None) -> set[str]:
    if not spec:
        return set()
    return {spec.get("type", "")}.union(*(_decoder_types(d) for d in spec.get("decoders") or []))


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """The bytes each token id appends to the output, or None for a special token (never text).

    Byte-level tokenizers (GPT-2 style) spell each byte as one vocab character, so a token's bytes
    are exact, partial UTF-8 included. Other tokenizers (SentencePiece/Metaspace, WordPiece) give a
    token's text as decode([anchor, t]) minus decode([anchor]), so a leading space that decode drops
    at the start of a text is kept; their byte-fallback tokens <0xNN> are the byte NN.
    Entries are computed on first use: the sampler asks about a few tokens per step, and a 150k vocab
    would cost seconds to precompute."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        hf = tokenizer._tok
        spec = json.loads(hf.decoder.__getstate__()) if hf.decoder is not None else None
        types = _decoder_types(spec)
        self.byte_level = _byte_level_chars() if "ByteLevel" in types else None
        self.byte_fallback = "ByteFallback" in types
        added = hf.get_added_tokens_decoder()
        self.special = {i for i, t in added.items() if t.special}
        self.added = {i: t.content.encode() for i, t in added.items() if not t.special}
        self.anchor: int | None = None
        self.cache: dict[int, bytes | None] = {}

    def __call__(self, token_id: int) -> bytes | None:
        try:
            return self.cache[token_id]
        except KeyError:
            data = self.cache[token_id] = self._compute(token_id)
            return data

    def _compute(self, token_id: int) -> bytes | None:
        if token_id in self.special:
            return None
        if token_id in self.added:
            return self.added[token_id]
        piece = self.tok.id_to_token(token_id)
        if piece is None:  # past the tokenizer's vocab (models often pad the embedding)
            return None
        if self.byte_level is not None:
            if all(c in self.byte_level for c in piece):
                return bytes(self.byte_level[c] for c in piece)
            return piece.encode()
        if self.byte_fallback and (m := _BYTE_FALLBACK.fullmatch(piece)):
            return bytes([int(m.group(1), 16)])
        if self.anchor is None:  # any ordinary token; its own text is cut off again below
            self.anchor = self.tok.encode("a", add_special_tokens=False)[0]
        head = self.tok.decode([self.anchor], skip_special_tokens=False)
        return self.tok.decode([self.anchor, token_id], skip_special_tokens=False)[len(head):].encode()


def token_bytes(tokenizer) -> TokenBytes:
    """The one TokenBytes of this tokenizer, kept on it so every sequence shares the cache."""
    table = getattr(tokenizer, "_json_token_bytes", None)
    if table is None:
        table = tokenizer._json_token_bytes = TokenBytes(tokenizer)
    return table


class JsonObjectGuide:
    """Per-sequence guide for JSON mode. The caller asks allows(t) for candidate tokens (in
    probability order) and advances with the one it picks; EOS is allowed only once the object is
    closed, and any other special token never."""

    def __init__(self, tokenizer, eos_ids: set[int]) -> None:
        self._bytes = token_bytes(tokenizer)
        self._eos = frozenset(eos_ids)
        self._state: State = START_STATE
        self._ended = False  # EOS committed: nothing more is allowed
        self._tried: tuple[int, State | None] | None = None  # last allows(): advance() reuses it

    def _next(self, token_id: int) -> State | None:
        if self._ended:
            return None
        if token_id in self._eos:
            return self._state if is_complete(self._state) else None
        if self._tried is not None and self._tried[0] == token_id:
            return self._tried[1]
        data = self._bytes(token_id)
        state = None if data is None else feed(self._state, data)
        self._tried = (token_id, state)
        return state

    def allows(self, token_id: int) -> bool:
        return self._next(token_id) is not None

    def advance(self, token_id: int) -> None:
        state = self._next(token_id)
        if state is None:
            raise ValueError(f"token {token_id} does not continue a JSON object here")
        self._ended = token_id in self._eos
        self._state = state
        self._tried = None

    @property
    def complete(self) -> bool:
        return is_complete(self._state)

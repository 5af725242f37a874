"""/tokenize and /detokenize (vLLM's shapes) on the served model's tokenizer.

The tokenizer is read-only once the model is loaded, so it runs in a worker thread beside the
engine thread and the event loop never waits on it.
"""
from __future__ import annotations

import asyncio

from .async_engine import AsyncEngine
from .errors import ApiError, model_not_found
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse


class TokenServing:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise model_not_found(name, self.model_name)

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """A prompt with special tokens (BOS) by default; chat messages through the chat template,
        which writes its own special tokens, so none are added by default."""
        self._check_model(req.model)
        engine = self.engine.engine  # EngineUnavailable (503) while the model loads
        tok = engine.tokenizer
        if req.messages is not None:
            messages = [m.as_template_dict() for m in req.messages]
            special = bool(req.add_special_tokens)

            def encode() -> list[int]:
                return tok.encode(tok.apply_chat_template(messages, req.add_generation_prompt), add_special_tokens=special)
        else:
            special = req.add_special_tokens is not False

            def encode() -> list[int]:
                return tok.encode(req.prompt, add_special_tokens=special)

        ids = await asyncio.to_thread(encode)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=engine.max_model_len)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        """Token ids -> text, special tokens included (so /tokenize's output comes back whole)."""
        self._check_model(req.model)
        engine = self.engine.engine
        vocab = engine.vocab_size
        bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"tokens[{bad}] = {req.tokens[bad]} is not a token id in [0, {vocab})", param="tokens")
        text = await asyncio.to_thread(engine.tokenizer.decode, req.tokens, False)
        return DetokenizeResponse(prompt=text)

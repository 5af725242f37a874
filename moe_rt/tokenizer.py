"""Tokenizer from a Hugging Face folder (tokenizer.json + tokenizer_config.json), chat templates
rendered with jinja2 in a sandbox, and incremental detokenization for streaming."""
from __future__ import annotations

from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from moe_rt.checkpoint import read_json
from moe_rt.errors import MoeRtError


def _token_str(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        d = Path(model_dir)
        if not (d / "tokenizer.json").is_file():
            raise MoeRtError(f"{model_dir} has no tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a corrupt or unknown file
            raise MoeRtError(f"{d / 'tokenizer.json'} is not a readable tokenizer: {e}") from None
        cfg = read_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        self.bos_token = _token_str(cfg.get("bos_token"))
        self.eos_token = _token_str(cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if template is None and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        self.chat_template: str | None = template
        self.vocab_size = self._tok.get_vocab_size()
        # Whether encode() puts BOS first (the tokenizer's post-processor decides), so a chat
        # prompt can start the way a plain prompt does.
        self.adds_bos = (self.bos_token_id is not None and self.encode("a")[:1] == [self.bos_token_id]
                         and self.encode("a", add_special_tokens=False)[:1] != [self.bos_token_id])

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise MoeRtError("this model has no chat template")
        if not messages:
            raise MoeRtError("messages must not be empty")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise MoeRtError("each message needs a 'role' and a 'content'")

        def raise_exception(msg):
            raise MoeRtError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise MoeRtError(f"chat template failed: {e}") from None
        except MoeRtError:
            raise
        except Exception as e:  # a template's own bug on this conversation (e.g. arithmetic on a
            # field it did not expect): the request cannot be rendered, which is not a server fault
            raise MoeRtError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat. They start with BOS exactly when encode() would start
        a plain prompt with it: a template that writes BOS itself ({{ bos_token }}) is encoded
        without special tokens, so BOS never appears twice; one that does not gets it added."""
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)
        if self.adds_bos and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids


class IncrementalDetokenizer:
    """Text deltas for a growing list of ids. Holds back pieces that end inside a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.prefix_offset = 0  # decode window start: a few tokens of context fix merges at the seam
        self.read_offset = 0  # ids up to here have been turned into text already

    def step(self, ids: list[int]) -> str:
        prefix = self.tok.decode(ids[self.prefix_offset : self.read_offset])
        full = self.tok.decode(ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(ids)
            return full[len(prefix) :]
        return ""

"""The demo model shipped in moe_rt/demo_model/ (made by scripts/train_demo_model.py).

These check the folder is a normal Hugging Face checkpoint of the promised
shape and that it learned English, using transformers as the reference loader.
"""

import json
from pathlib import Path

import jinja2
import pytest
import torch

DEMO_DIR = Path(__file__).resolve().parents[1] / "moe_rt" / "demo_model"
MAX_BYTES = 32_000_000
KJV_WORDS = {"the", "and", "god", "of", "lord", "earth", "heaven", "was", "he", "that", "unto", "in", "created"}

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((DEMO_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="module")
def model():
    m = transformers.AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32)
    return m.eval()


def test_folder_has_hf_files_and_no_package_init():
    names = {p.name for p in DEMO_DIR.iterdir()}
    for required in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "training_summary.json"):
        assert required in names
    assert "__init__.py" not in names  # package data, not a package


def test_weights_fit_size_budget_and_are_bf16():
    from safetensors import safe_open

    assert (DEMO_DIR / "model.safetensors").stat().st_size <= MAX_BYTES
    with safe_open(str(DEMO_DIR / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}


def test_shape_is_a_real_moe(config):
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["num_local_experts"] >= 16
    assert config["num_experts_per_tok"] == 2
    assert config["num_hidden_layers"] >= 6
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA


def test_transformers_loads_model(model, config):
    assert model.config.num_local_experts == config["num_local_experts"]
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[0] == config["num_local_experts"]
    assert not torch.isnan(experts.down_proj).any()


def test_tokenizer_prepends_bos_and_round_trips(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    for text in ["In the beginning God created the heaven and the earth.",
                 "  odd   spacing,\ttabs\nand newlines  ",
                 "Ünïcödé: 創世記 — שָׁלוֹם 🙂"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_renders_with_plain_jinja(tokenizer):
    source = json.loads((DEMO_DIR / "tokenizer_config.json").read_text())["chat_template"]
    messages = [{"role": "user", "content": "Who made the light?"},
                {"role": "assistant", "content": "God."},
                {"role": "user", "content": "When?"}]
    rendered = jinja2.Template(source).render(messages=messages, add_generation_prompt=True,
                                              bos_token="<s>", eos_token="</s>")
    assert rendered == "user: Who made the light?\nassistant: God.\nuser: When?\nassistant:"
    no_prompt = jinja2.Template(source).render(messages=messages[:1], add_generation_prompt=False,
                                               bos_token="<s>", eos_token="</s>")
    assert no_prompt == "user: Who made the light?\n"
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == rendered


def test_greedy_continuation_is_kjv_english(model, tokenizer):
    ids = tokenizer("In the beginning", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    words = [w.strip(".,;:!?'()").lower() for w in text.split()]
    words = [w for w in words if w]
    assert len(words) >= 10, text
    assert len(set(words)) >= 6, f"degenerate repetition: {text!r}"
    assert len(KJV_WORDS & set(words)) >= 3, text
    assert sum(w.isalpha() for w in words) >= 0.8 * len(words), text


def test_summary_records_measured_training(config):
    summary = json.loads((DEMO_DIR / "training_summary.json").read_text())
    assert summary["options"]["num_experts"] == config["num_local_experts"]
    assert summary["model_safetensors_bytes"] == (DEMO_DIR / "model.safetensors").stat().st_size
    ev = summary["evaluation"]
    assert ev["val_loss"] < ev["unigram_val_loss"]  # learned more than word frequencies
    assert len(ev["routing"]["load_per_expert"]) == config["num_hidden_layers"]

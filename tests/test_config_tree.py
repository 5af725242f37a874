"""The config tree: one YAML file read by one loader, flags over the file, cross-section rules,
and help text on every field."""
from __future__ import annotations

import argparse

import pytest
from pydantic import BaseModel

from moe_rt.errors import MoeRtError
from moe_rt_app.cli.flags import add_ep_arguments, add_model_arguments, config_from_args
from moe_rt_app.config import RuntimeConfig, build_config, load_config_file


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, f in model.model_fields.items():
        yield prefix + name, f
        for sub in getattr(f.annotation, "__args__", (f.annotation,)):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from _fields(sub, prefix + name + ".")


def test_every_field_of_every_section_has_help_text():
    missing = [name for name, f in _fields(RuntimeConfig) if not f.description]
    assert missing == []
    assert {"engine", "cache", "predictor", "parallel", "expert_parallel", "server"} <= set(RuntimeConfig.model_fields)


def test_one_file_holds_every_section(tmp_path):
    path = tmp_path / "moe-rt.yaml"
    path.write_text("model: m\ndtype: float32\nengine: {max_num_seqs: 3}\n"
                    "cache: {offload: cpu, capacity_slots: 2, policy: predictive}\n"
                    "predictor: {name: gate_lookahead}\nserver: {port: 0, max_queue: 7}\n")
    cfg = build_config(config=str(path))
    assert (cfg.model, cfg.dtype, cfg.engine.max_num_seqs) == ("m", "float32", 3)
    assert cfg.cache.capacity_slots == 2 and cfg.predictor.name == "gate_lookahead"
    assert (cfg.server.port, cfg.server.max_queue) == (0, 7) and cfg.offload
    # keyword options override the file, field by field for the engine
    cfg = build_config(config=str(path), max_num_seqs=5, dtype="bfloat16")
    assert (cfg.engine.max_num_seqs, cfg.dtype, cfg.cache.capacity_slots) == (5, "bfloat16", 2)


def test_a_cache_section_naming_its_predictor_is_the_predictor_section(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("cache: {capacity_slots: 2, policy: predictive, predictor: frequency, predictor_dir: t.npz}\n")
    cfg = build_config(model="m", placement=str(path))
    assert (cfg.predictor.name, cfg.predictor.dir) == ("frequency", "t.npz")
    assert "predictor" not in cfg.cache.model_dump()
    path.write_text("cache: {capacity_slots: 2, predictor: frequency}\npredictor: {name: path}\n")
    with pytest.raises(MoeRtError, match="keep one"):
        build_config(model="m", placement=str(path))


@pytest.mark.parametrize("options, message", [
    ({"cache": {"capacity_slots": 2, "policy": "predictive"}}, "cache policy predictive needs a predictor"),
    ({"cache": {"capacity_slots": 2}, "parallel": {"ep": 2}}, "does not combine with an expert cache"),
    ({"predictor": "residual_gate"}, "only for expert parallelism's speculative dispatcher"),
    ({"predictor": "gate_lookahead", "parallel": {"ep": 2}}, "set parallel.dispatcher speculative"),
    ({"predictor": "nope"}, "unknown predictor 'nope'"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"predictor_dir": "x"}, "need predictor=NAME"),
])
def test_rules_across_sections_are_one_line(options, message):
    with pytest.raises(MoeRtError, match=message) as e:
        build_config(model="m", **options)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "must be a mapping"),
    ("cache: [1]", "cache: must be a mapping"),
    ("caches: {}", "unknown section 'caches'"),
    ("cache: {capacity_slots: 2", "not valid YAML"),
])
def test_bad_files_are_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(MoeRtError, match=message):
        load_config_file(path)


def _parse(argv):
    p = argparse.ArgumentParser()
    add_model_arguments(p)
    add_ep_arguments(p, "ranks")
    p.add_argument("--max-num-seqs", type=int)
    return p.parse_args(argv)


def test_flags_override_single_fields_of_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("engine: {max_num_seqs: 3, kv_cache_memory_gb: 0.5}\n"
                    "cache: {offload: disk, capacity_slots: 2, prefetch_queue: 3}\n")
    cfg = config_from_args(_parse(["--model", "m", "--config", str(path), "--max-num-seqs", "9",
                                   "--expert-cache-slots", "4"]))
    assert (cfg.engine.max_num_seqs, cfg.engine.kv_cache_memory_gb) == (9, 0.5)
    assert (cfg.cache.offload, cfg.cache.capacity_slots, cfg.cache.prefetch_queue) == ("disk", 4, 3)
    # one predictor, whichever flag names it; two different names are refused
    cfg = config_from_args(_parse(["--model", "m", "--ep", "2", "--ep-dispatcher", "speculative",
                                   "--ep-predictor", "gate_lookahead"]))
    assert cfg.predictor.name == "gate_lookahead" and cfg.parallel.ep == 2
    with pytest.raises(MoeRtError, match="name one predictor"):
        config_from_args(_parse(["--model", "m", "--predictor", "frequency", "--track-predictor", "path"]))


def test_errors_name_the_flag_or_the_yaml_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache: {capacity_slots: 2, capacity_gb: 1}\n")
    with pytest.raises(MoeRtError, match="give exactly one of capacity_slots and capacity_gb"):
        config_from_args(_parse(["--model", "m", "--placement", str(path)]))
    with pytest.raises(MoeRtError, match="give exactly one of --expert-cache-slots and --expert-cache-gb"):
        config_from_args(_parse(["--model", "m", "--offload", "cpu"]))
    with pytest.raises(MoeRtError, match="^--predictor unknown predictor 'clairvoyant'"):
        config_from_args(_parse(["--model", "m", "--track-predictor", "clairvoyant"]))


def test_ep_with_a_cache_section_in_the_file_is_refused_in_one_line(mixtral_dir, tmp_path, capsys):
    from moe_rt_app.cli.main import main

    path = tmp_path / "p.yaml"
    path.write_text("cache: {offload: cpu, capacity_slots: 2}\n")
    for command in (["serve", "--port", "0"], ["generate", "--prompt", "x"]):
        assert main([*command, "--model", str(mixtral_dir), "--ep", "2", "--placement", str(path)]) == 2
        err = capsys.readouterr().err
        assert err == ("moe-rt: error: expert parallelism (--ep > 1) does not combine with an expert cache yet; "
                       "remove the cache section or run on one rank\n")

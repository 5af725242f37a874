"""Reading tensors from a Hugging Face checkpoint folder (one or several *.safetensors files).

Files are opened lazily with safetensors (memory-mapped), so asking for one expert reads only its
bytes: the expert cache's disk tier relies on this.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from moe_rt.errors import MoeRtError

from .models.spec import ModelSpec
from .quant.checkpoint import SCALE_SUFFIX, checkpoint_quantization, dequantize_fp8


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir)
    if not path.is_dir():
        raise MoeRtError(f"model folder {model_dir} does not exist")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise MoeRtError(f"{model_dir} has no config.json (not a Hugging Face model folder)")
    return read_json(cfg)


def read_json(path: Path) -> dict:
    """A JSON object from a file of the checkpoint; any problem is a one-line MoeRtError."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoeRtError(f"{path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MoeRtError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, dict):
        raise MoeRtError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


class CheckpointReader:
    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise MoeRtError(f"{index} has no 'weight_map' of tensor names to file names")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise MoeRtError(f"{model_dir} holds no *.safetensors weights")
        self._handles = {}
        for f in files:
            if not (self.dir / f).is_file():
                raise MoeRtError(f"{model_dir}: weight file {f} named in the index is missing")
            try:
                self._handles[f] = safe_open(str(self.dir / f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise MoeRtError(f"{self.dir / f} is not a readable safetensors file: {e}") from None
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self.weight_map: dict[str, str] = weight_map
        cfg = self.dir / "config.json"
        # Block-scaled FP8 weights are dequantised as they are read (quant/checkpoint.py).
        self.fp8 = checkpoint_quantization(read_json(cfg), str(cfg)) if cfg.is_file() else None

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored, or dequantised to float32 when it is a block-scaled FP8 weight."""
        t = self._raw(name)
        if self.fp8 is not None and t.dtype == torch.float8_e4m3fn:
            return dequantize_fp8(t, self._raw(name + SCALE_SUFFIX), self.fp8.block, name)
        return t

    def _raw(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise MoeRtError(f"tensor '{name}' is missing from the checkpoint in {self.dir}")
        try:
            return self._handles[self.weight_map[name]].get_tensor(name)
        except Exception as e:  # safetensors' own errors: a name the index lists but the file lacks, bad data
            raise MoeRtError(f"cannot read tensor '{name}' from {self.dir / self.weight_map[name]}: {e}") from None

    def tensor_info(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype string such as 'BF16') without reading the data."""
        try:
            sl = self._handles[self.weight_map[name]].get_slice(name)
        except Exception as e:
            raise MoeRtError(f"cannot read tensor '{name}' from {self.dir / self.weight_map[name]}: {e}") from None
        return tuple(sl.get_shape()), sl.get_dtype()

    def get_shaped(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.get(name)
        if tuple(t.shape) != tuple(shape):
            raise MoeRtError(f"tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        return t

    def read_expert(self, spec: ModelSpec, moe_index: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13 [2I, D], w2 [D, I]) of one routed expert, in the checkpoint's dtype."""
        D, I = spec.hidden_size, spec.moe.intermediate_size
        base = f"model.layers.{spec.moe_layer_ids[moe_index]}.{spec.moe_weight_prefix}.experts"
        if self.has(f"{base}.gate_up_proj"):  # transformers v5 in-memory layout saved as is
            w13 = self.get_shaped(f"{base}.gate_up_proj", (spec.num_experts, 2 * I, D))[expert]
            w2 = self.get_shaped(f"{base}.down_proj", (spec.num_experts, D, I))[expert]
            return w13, w2
        g, u, d = spec.expert_names
        w1 = self.get_shaped(f"{base}.{expert}.{g}.weight", (I, D))
        w3 = self.get_shaped(f"{base}.{expert}.{u}.weight", (I, D))
        w2 = self.get_shaped(f"{base}.{expert}.{d}.weight", (D, I))
        return torch.cat([w1, w3], dim=0), w2


DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"


def default_model_dir() -> str:
    """The shipped demo model's folder: what every command and `LLM()` load without a model."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise MoeRtError(f"no model given and the demo model is not installed at {DEMO_MODEL_DIR}")
    return str(DEMO_MODEL_DIR)

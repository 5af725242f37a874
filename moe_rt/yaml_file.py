"""Reading a user's YAML file (config, bits plan): every problem one line naming the file."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from moe_rt.errors import MoeRtError


def read_yaml_file(path: str | Path, what: str) -> Any:
    """The parsed document of `path` (None for an empty file); `what` names the file's kind in
    errors ("config file", "bits plan")."""
    p = Path(path)
    if not p.is_file():
        raise MoeRtError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise MoeRtError(f"{what} {path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise MoeRtError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None

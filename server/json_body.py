"""A request body -> a JSON object, or a 400 that says what is wrong with it.

Python's json module is more lenient than JSON and fails in ways that are not JSONDecodeError;
each of those is bad input and must be a 400, never a 500:
  * it accepts NaN, Infinity and -Infinity literals (not JSON): refused here;
  * it accepts escaped lone surrogates ("\\ud800"), which no UTF-8 encoder can write back
    (tokenizers, logs and responses would raise later): refused here as invalid unicode;
  * arrays or objects nested a few thousand deep raise RecursionError;
  * integers of more than 4300 digits raise ValueError (Python's int-from-string limit).
Bodies must be UTF-8 (JSON's encoding); any Content-Type is read as JSON.
"""
from __future__ import annotations

import json
import re

from .errors import ApiError

# Only a \uD800-\uDFFF escape can put a surrogate into a decoded string (the UTF-8 decoder refuses
# encoded ones), so bodies without one skip the walk over every string.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _bad(message: str) -> ApiError:
    return ApiError(400, message, code="invalid_json")


def _no_constants(name: str):
    raise _bad(f"the body is not valid JSON: {name} is not a JSON number")


def _has_lone_surrogate(obj) -> bool:
    """True if any key or string value holds a lone surrogate. Iterative: the depth is unbounded."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def load_json_object(raw: bytes) -> dict:
    if not raw.strip():
        raise _bad("the body is empty; send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(f"the body is not valid JSON: it is not UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise _bad("the body is not valid JSON: arrays or objects are nested too deeply") from None
    except json.JSONDecodeError as e:
        raise _bad(f"the body is not valid JSON: {e}") from None
    except ValueError:  # the only other ValueError: an integer with more digits than Python converts
        raise _bad("the body is not valid JSON: a number has too many digits") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(data):
        raise ApiError(400, "invalid unicode: the body holds a lone UTF-16 surrogate escape (\\ud800-\\udfff)",
                       code="invalid_unicode")
    if not isinstance(data, dict):
        raise _bad("the body must be a JSON object")
    return data

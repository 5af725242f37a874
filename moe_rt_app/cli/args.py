"""argparse `type=` helpers shared by every `moe-rt` command.

A range check in `type=` fails during parsing, before any model loads, and argparse names the
flag: `--port 70000` becomes `moe-rt: error: --port must be in 0..65535, got 70000` (moe_rt_app/cli/main.py
turns argparse's 'argument --port: ...' into that one line). Output paths are checked while
parsing and get their folders created right after it, so `--plot new/dir/x.png` works the same
for every command.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Callable

from moe_rt.sampling_params import SEED_MAX, SEED_MIN


def int_in(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer type accepting lo <= value <= hi (either bound may be None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval given by lo/hi; lo_open/hi_open exclude that bound."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
        bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
        if not math.isfinite(value) or bad_lo or bad_hi:
            raise argparse.ArgumentTypeError(f"must be {_interval(lo, hi, lo_open, hi_open)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _bounds(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in {lo}..{hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"a finite number {'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"a finite number {'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


port = int_in(0, 65535)
positive_int = int_in(1)
seed = int_in(SEED_MIN, SEED_MAX)
positive_float = float_in(0, lo_open=True)
non_negative_float = float_in(0)


def output_file(path: str) -> str:
    """A file the command will write. Parsing only checks that it can be written; the folders
    above it are created by moe_rt_app.cli.main after parsing (make_output_folders, like `mkdir -p`)."""
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a folder, not a file")
    return _writable(path)


def output_dir(path: str) -> str:
    """A folder the command will write (it creates the folder itself); as output_file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{path} is a file, not a folder")
    return _writable(path)


def _writable(path: str) -> str:
    """`path` unless the folders above it cannot be created: the nearest one that exists must be
    a folder this process may write to."""
    above = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise argparse.ArgumentTypeError(f"cannot write {path}: {above} is a file")
    if not os.path.exists(os.path.dirname(os.path.abspath(path))) and not os.access(above, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {path}: no permission to create folders in {above}")
    return path


def make_output_folders(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Create the folders above every output path the command line gave (flags typed
    output_file / output_dir). Run once by moe_rt_app.cli.main after parsing, so parsing has no effects."""
    from moe_rt.errors import MoeRtError

    for action in parser._actions:
        path = getattr(args, action.dest, None)
        if action.type in (output_file, output_dir) and path:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError as e:  # a race, or a read-only file system
                raise MoeRtError(f"{action.option_strings[-1]} cannot write {path}: {e.strerror or e}") from None

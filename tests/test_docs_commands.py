"""Every `moe-rt` command shown in README.md and docs/*.md parses with the real CLI, and the ones
that run on the shipped demo model with no outside files run, with token counts and durations
cut down, in a temporary folder.

A command is a line of a fenced shell block (or its `\\`-continued lines) whose program is
`moe-rt` or `.venv/bin/moe-rt`, after `VAR=value` prefixes; `$VAR` is expanded from the block's
own assignments. Placeholders are read as a user would fill them in: `[--flag x]` is optional
text that is kept, `a|b` takes `a`, a lone `...` is dropped.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moe_rt_app.cli.main import BENCHES, COMMANDS, _load, _Parser, main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
OUTPUT_FLAGS = {"--out", "--plot", "--json-out"}
INPUT_FLAGS = {"--model", "--trace", "--fit-on", "--prompts", "--placement", "--config", "--predictor-dir", "--text"}
# flag -> largest value a run keeps (the docs' own sizes take minutes)
SHRINK = {"--max-tokens": 2, "--duration": 1, "--repeats": 1, "--epochs": 1, "--clients": 2,
          "--fit-prompts": 2, "--rss-interval": 0.5, "--prompt-len": 8}


@dataclass(frozen=True)
class DocCommand:
    where: str  # "docs/x.md:12"
    argv: tuple[str, ...]  # after `moe-rt`
    fenced: bool = True  # False: an inline `moe-rt ...` in the prose (parsed, never run)
    transcript: bool = False  # shown after a `$ ` prompt with its output (parsed, never run)

    def __str__(self) -> str:
        return f"{self.where}: moe-rt {shlex.join(self.argv)}"


def _fenced_lines(path: Path):
    """(line number, text) of the lines of shell code blocks, continuations joined."""
    fence, joined, start = None, "", 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fence is None:
                fence = line.strip()[3:].strip().lower()
            else:
                fence = None
                yield None, ""  # a block ends: its variables end with it
            continue
        if fence not in SHELL_FENCES:
            continue
        if not joined:
            start = n
        joined += line.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        yield start, joined
        joined = ""


def _words(text: str, env: dict[str, str]) -> list[str]:
    text = re.sub(r"(?<=\s)\.\.\.(?=\s|$)", "", text)  # "same flags otherwise"; a quoted "..." stays
    text = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), text)
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return []
    for i, w in enumerate(words):
        if w in ("|", "||", "&&", ";", "&") or w.startswith((">", "2>")):
            return words[:i]
    return words


def _expand_loops(lines):
    """`for V in a b; do BODY; done` -> (n, text, {V: value}) for each value and body line."""
    loop = None
    for n, text in lines:
        head = re.match(r"\s*for (\w+) in ([^;]+); do\s*$", text or "")
        if head:
            loop = (head.group(1), head.group(2).split(), [])
        elif loop and text.strip() == "done":
            var, values, body = loop
            loop = None
            yield from ((m, t, {var: v}) for v in values for m, t in body)
        elif loop:
            loop[2].append((n, text))
        else:
            yield n, text, {}


def doc_commands(path: Path) -> list[DocCommand]:
    found, env = [], {}
    for n, text, loop_env in _expand_loops(_fenced_lines(path)):
        if n is None:
            env = {}
            continue
        transcript = bool(re.match(r"\s*\$\s", text))
        words = _words(re.sub(r"^\s*\$\s+", "", text), {**env, **loop_env})
        if words and words[0] == "export":
            words = words[1:]
        if words and all("=" in w and w.split("=")[0].isidentifier() for w in words):
            env.update(w.split("=", 1) for w in words)
            continue
        while words and "=" in words[0] and words[0].split("=")[0].isidentifier():
            words = words[1:]  # VAR=value prefixes
        if not words or not (words[0] == "moe-rt" or words[0].endswith("/moe-rt")):
            continue
        found.append(DocCommand(f"{path.relative_to(REPO)}:{n}", _fill_in(words[1:]), transcript=transcript))
    return found


def inline_commands(path: Path) -> list[DocCommand]:
    """`moe-rt ... --flag ...` code spans in the prose (outside code blocks)."""
    text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), path.read_text(), flags=re.S)
    found = []
    for m in re.finditer(r"`(?:\w+=\S+ )*(?:\.venv/bin/)?moe-rt ([^`]*--[^`]*)`", text):
        words = _words(m.group(1).replace("\n", " "), {})
        line = text.count("\n", 0, m.start()) + 1
        found.append(DocCommand(f"{path.relative_to(REPO)}:{line}", _fill_in(words), fenced=False))
    return found


def _fill_in(words: list[str]) -> tuple[str, ...]:
    argv = []
    for w in words:
        w = w.strip("[]")
        if not w:
            continue
        if re.fullmatch(r"[\w.-]+(\|[\w.-]+)+", w):
            w = w.split("|")[0]
        argv.append(w)
    return tuple(argv)


ALL = [c for p in DOCS for c in doc_commands(p) + inline_commands(p)]


def _split(argv) -> tuple[dict, str, list[str]]:
    if argv[0] == "bench":
        return BENCHES, argv[1], list(argv[2:])
    return COMMANDS, argv[0], list(argv[1:])


# Placeholders in synopses that argparse checks as numbers, read as a user would fill them in.
NUMBER_PLACEHOLDERS = {"N": "4", "R": "1", "D": "2", "Q": "8", "C": "4", "M": "1", "X": "1.1"}


def parse(argv):
    """argparse's reading of argv, with the parser moe_rt_app.cli.main.main builds for that command."""
    table, name, rest = _split([NUMBER_PLACEHOLDERS.get(w, w) for w in argv])
    assert name in table, f"unknown command {name!r}"
    add_arguments, _ = _load(table[name][0])
    parser = _Parser(prog=f"moe-rt {name}", description=table[name][1])
    add_arguments(parser)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(rest)
    except SystemExit:
        pytest.fail(f"does not parse: {err.getvalue().strip()}")


def test_docs_show_commands():
    assert len(ALL) > 40 and any(c.where.startswith("README.md") for c in ALL)


@pytest.mark.parametrize("cmd", ALL, ids=str)
def test_doc_command_parses(cmd):
    parse(cmd.argv)


# -- running them ---------------------------------------------------------------------------------

def why_not_run(cmd: DocCommand, argv: list[str]) -> str | None:
    """None when the command runs here on the demo model; else why it is only parsed."""
    table, name, rest = _split(argv)
    cuda = torch.cuda.is_available()
    if not cmd.fenced or cmd.transcript:
        return "shown in the prose or as a transcript"
    if table is COMMANDS and name == "serve":
        return "a server runs until stopped (tests/server starts it)"
    if "--synthetic" in rest:
        return "builds a synthetic model, not the demo model"
    if "--slow-link" in rest:
        return "needs root for network namespaces"
    if not cuda and ("cuda" in rest or (name == "kernel" and "--interpret-smoke" not in rest)):
        return "needs a CUDA GPU"
    for flag, value in zip(rest, rest[1:]):
        names_file = flag in INPUT_FLAGS or (flag == "--expert-bits" and not re.fullmatch(r"[\d,]+", value))
        if names_file and not Path(value).exists():  # --expert-bits also takes a bits plan's path
            return f"needs {value}, which the doc does not create"
    return None


def prepare(argv: tuple[str, ...], work: Path) -> list[str]:
    """argv to run in folder `work`: inputs from the checkout or made by earlier commands,
    outputs (and anything under /tmp) inside `work`, sizes cut down to SHRINK."""
    out = list(argv)
    for i in range(1, len(out)):
        flag, value = out[i - 1], out[i]
        if flag in SHRINK:
            cap = SHRINK[flag]
            try:
                out[i] = str(min(type(cap)(value), cap))
            except ValueError:
                pass
        elif value.startswith("/tmp/"):
            out[i] = str(work / value[1:])
        elif flag in OUTPUT_FLAGS:
            out[i] = str(work / value)
        elif flag in INPUT_FLAGS and not (work / value).exists() and (REPO / value).exists():
            out[i] = str(REPO / value)
        else:
            continue
        if flag in OUTPUT_FLAGS:
            Path(out[i]).parent.mkdir(parents=True, exist_ok=True)
    return out


def run_command(argv: list[str], work: Path) -> tuple[int, str]:
    if argv[:2] == ["bench", "kernel"]:  # Triton picks its interpreter at import: a fresh process
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        r = subprocess.run([sys.executable, "-m", "moe_rt_app.cli.main", *argv], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
        return r.returncode, r.stderr
    err, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.chdir(work), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            return main(argv), err.getvalue()
    finally:
        torch.set_num_threads(threads)  # --torch-threads must not slow the tests that follow


def _in_doc(doc: Path) -> list[DocCommand]:
    return [c for c in ALL if c.where.startswith(f"{doc.relative_to(REPO)}:")]


@pytest.mark.slow
@pytest.mark.parametrize("doc", [d for d in DOCS if any(c.fenced for c in _in_doc(d))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_doc_commands_run(doc, tmp_path):
    """The doc's commands in order, in one folder, so later ones read what earlier ones wrote."""
    ran, parsed_only = [], []
    for cmd in _in_doc(doc):
        argv = prepare(cmd.argv, tmp_path)
        with contextlib.chdir(tmp_path):
            why = why_not_run(cmd, argv)
        if why:
            parsed_only.append(f"{cmd.where} ({why})")
            continue
        t = time.perf_counter()
        code, err = run_command(argv, tmp_path)
        assert code == 0, f"{cmd} -> exit {code}: {err.strip()[-2000:]}"
        ran.append(f"{cmd.where} {time.perf_counter() - t:.1f}s")
    print(f"ran: {ran}\nparsed only: {parsed_only}")  # shown with -rP or -s

"""Build the KJV prompt sets used to measure routing predictors (docs/benchmarks-router-predict.md).

    python scripts/make_prompt_sets.py            # writes data/prompts/kjv-fit.txt and kjv-heldout.txt

- fit: verses from Genesis..Deuteronomy, text the demo model trained on; traces of it train the
  learned predictors.
- held-out: verses from Hebrews..Revelation, the books scripts/train_demo_model.py keeps out of
  training (its VAL_FIRST_BOOK), so predictors are judged on text neither they nor the model saw.

Each line is one verse, or two consecutive verses of the same book when the first is short, picked
by a seeded random draw, so the files are reproducible. Needs the `bible` program (Debian package
bible-kjv: apt-get install -y bible-kjv).
"""
from __future__ import annotations

import argparse
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSE_RE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<ch>\d+):(?P<vs>\d+) (?P<text>.*)$")
FIT_BOOKS = ("Ge", "Exo", "Lev", "Num", "Deu")  # the `bible` program's abbreviations
HELD_OUT_FIRST = "Heb"  # Hebrews..Revelation: must match VAL_FIRST_BOOK in train_demo_model.py
MIN_CHARS = 80  # a shorter verse gets the next verse of its book appended


def load_books() -> list[tuple[str, list[str]]]:
    """[(book abbreviation, [verse text, ...])] in canonical order."""
    if shutil.which("bible") is None:
        sys.exit("error: the `bible` program is missing; install it with: apt-get install -y bible-kjv")
    out = subprocess.run(["bible", "-p", "/usr/lib", "-f", "Gen1:1-Rev22:21"], check=True,
                         capture_output=True, text=True).stdout
    books: list[tuple[str, list[str]]] = []
    for line in out.splitlines():
        m = VERSE_RE.match(line)
        if m is None:
            continue
        if not books or books[-1][0] != m["book"]:
            books.append((m["book"], []))
        books[-1][1].append(m["text"].strip())
    names = [b for b, _ in books]
    if HELD_OUT_FIRST not in names or any(b not in names for b in FIT_BOOKS):
        sys.exit(f"error: unexpected `bible` output (books {names[:3]}..{names[-3:]})")
    return books


def pick_prompts(verses: list[list[str]], count: int, seed: int) -> list[str]:
    """`count` prompts from distinct start verses, in canonical order; verses: per book."""
    starts = [(b, v) for b, book in enumerate(verses) for v in range(len(book))]
    if count > len(starts):
        sys.exit(f"error: asked for {count} prompts but only {len(starts)} verses are available")
    chosen = sorted(random.Random(seed).sample(starts, count))
    prompts = []
    for b, v in chosen:
        text = verses[b][v]
        if len(text) < MIN_CHARS and v + 1 < len(verses[b]):
            text = f"{text} {verses[b][v + 1]}"
        prompts.append(text)
    return prompts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=str(REPO / "data" / "prompts"))
    p.add_argument("--fit", type=int, default=256, help="prompts in the fit set")
    p.add_argument("--held-out", type=int, default=64, help="prompts in the held-out set")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    books = load_books()
    names = [b for b, _ in books]
    first_held = names.index(HELD_OUT_FIRST)
    fit = [v for b, v in books if b in FIT_BOOKS]
    held = [v for _, v in books[first_held:]]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, verses, count in (("kjv-fit.txt", fit, args.fit), ("kjv-heldout.txt", held, args.held_out)):
        prompts = pick_prompts(verses, count, args.seed)
        (out / name).write_text("\n".join(prompts) + "\n")
        print(f"{out / name}: {len(prompts)} prompts from {sum(len(v) for v in verses)} verses")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Builds a HellaSwag-shaped cloze task from any held-out text, for `qforge eval --task`.

Each document is one line of the text cut at a word boundary: the beginning is the context
("query"), the true continuation (the next few words of the same line) is one of the "choices",
and the other choices are spans of the same number of words drawn from other lines of the text.
The output is lm-evaluation-harness's HellaSwag document shape after its process_docs, one JSON
object per line:

    {"query": "And God said, Let there", "choices": ["be light: and there", "...", ...], "gold": 0,
     "source": "kjv.txt:3"}

Deterministic: the same text, options and --seed give the same file on any machine and Python
version (own splitmix64 generator, no `random`). Standard library only.

Example (the demo's held-out 2% of the KJV, 200 questions with 4 choices):
    python3 scripts/make_cloze_task.py data/corpora/kjv.txt --tail 0.02 --n 200 --out runs/demo/cloze.jsonl
then: qforge eval runs/demo/qat_int3 --task runs/demo/cloze.jsonl
"""
import argparse
import json
import os
import sys

MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.s = seed & MASK

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def below(self, n):
        """Uniform integer in [0, n) (rejection sampling, no modulo bias)."""
        if n <= 0:
            raise ValueError(n)
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self.next()
            if x < limit:
                return x % n

    def between(self, lo, hi):
        return lo + self.below(hi - lo + 1)

    def shuffle(self, xs):
        for i in range(len(xs) - 1, 0, -1):  # Fisher-Yates
            j = self.below(i + 1)
            xs[i], xs[j] = xs[j], xs[i]


def span(text):
    lo, _, hi = text.partition(":")
    try:
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX words (e.g. 6:24), found {text!r}")
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, found {text!r}")
    return lo, hi


def read_lines(paths, tail):
    """(source, words) for each non-blank line of the last `tail` fraction of each file."""
    out = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except UnicodeDecodeError as e:
            sys.exit(f"make_cloze_task: {p}: not valid UTF-8 ({e})")
        except OSError as e:
            sys.exit(f"make_cloze_task: {p}: {e.strerror}")
        start = len(lines) - int(round(len(lines) * tail))
        for i in range(start, len(lines)):
            words = lines[i].split()
            if words:
                out.append((f"{os.path.basename(p)}:{i + 1}", words))
    return out


def build(units, n, n_choices, ctx, cont, seed):
    rnd = SplitMix64(seed)
    need = ctx[0] + cont[0]
    cand = [i for i, (_, w) in enumerate(units) if len(w) >= need]
    if len(cand) < n:
        sys.exit(f"make_cloze_task: only {len(cand)} lines have at least {need} words (--ctx-words MIN + "
                 f"--cont-words MIN); asked for --n {n}")
    others = [i for i, (_, w) in enumerate(units) if len(w) >= cont[0]]
    rnd.shuffle(cand)
    docs = []
    for i in sorted(cand[:n]):
        src, w = units[i]
        k = rnd.between(ctx[0], min(ctx[1], len(w) - cont[0]))
        c = min(len(w) - k, rnd.between(cont[0], cont[1]))
        truth = " ".join(w[k:k + c])
        choices, seen, tries = [truth], {truth}, 0
        while len(choices) < n_choices:
            tries += 1
            if tries > 1000:
                sys.exit(f"make_cloze_task: no {n_choices - 1} distinct distractors of {c} words for {src}")
            j = others[rnd.below(len(others))]
            ow = units[j][1]
            if j == i or len(ow) < c:
                continue
            s = rnd.below(len(ow) - c + 1)
            d = " ".join(ow[s:s + c])
            if d not in seen:
                seen.add(d)
                choices.append(d)
        gold = rnd.below(n_choices)
        choices[0], choices[gold] = choices[gold], choices[0]
        docs.append({"query": " ".join(w[:k]), "choices": choices, "gold": gold, "source": src})
    return docs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("text", nargs="+", help="held-out UTF-8 text file(s); every non-blank line is a candidate")
    ap.add_argument("--out", required=True, help="task file to write (JSONL)")
    ap.add_argument("--n", type=int, default=200, help="documents (default 200)")
    ap.add_argument("--choices", type=int, default=4, help="choices per document, the true one included (default 4)")
    ap.add_argument("--ctx-words", type=span, default=(6, 24), help="context length in words, MIN:MAX (default 6:24)")
    ap.add_argument("--cont-words", type=span, default=(4, 10),
                    help="continuation length in words, MIN:MAX (default 4:10; distractors have the same count)")
    ap.add_argument("--tail", type=float, default=1.0,
                    help="use only the last FRACTION of each file's lines (the held-out split; default 1 = all)")
    ap.add_argument("--seed", type=int, default=1234, help="generator seed (default 1234)")
    a = ap.parse_args(argv)
    if a.n < 1 or a.choices < 2:
        ap.error("--n must be >= 1 and --choices >= 2")
    if not 0 < a.tail <= 1:
        ap.error("--tail must be in (0, 1]")
    docs = build(read_lines(a.text, a.tail), a.n, a.choices, a.ctx_words, a.cont_words, a.seed)
    tmp = f"{a.out}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(tmp, a.out)
    print(f"make_cloze_task: {len(docs)} documents, {a.choices} choices each -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

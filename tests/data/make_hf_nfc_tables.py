"""Writes data/hf_tokenizer.nfc.inc: the Unicode tables data/hf_tokenizer.cpp needs for the NFC
normalizer of tokenizer.json files (Qwen2/2.5/3), made from Python's unicodedata and checked
against the `tokenizers` library's own NFC normalizer, which is what qforge must agree with.

  .venv/bin/python tests/data/make_hf_nfc_tables.py    # from the repository root

Tables (code points, Hangul syllables excluded: they are algorithmic):
  kNfcDecomp: {cp | kComposes, first, second} for every canonical decomposition (second = 0 for a
              singleton); kComposes (bit 31) marks the primary composites NFC recomposes;
  kNfcCcc:    {first, last, class} ranges of non-zero canonical combining classes.
`tokenizers` (its unicode-normalization-alignments crate) uses older Unicode data than Python: the
code points where the two disagree are given the crate's behaviour (adjust_to_tokenizers, listed in
the file's header), and the script refuses to write tables that do not reproduce `tokenizers` on
every code point's probes (check)."""
import os
import sys
import unicodedata

from tokenizers import normalizers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "data", "hf_tokenizer.nfc.inc")
COMPOSES = 1 << 31
S_BASE, L_BASE, V_BASE, T_BASE = 0xAC00, 0x1100, 0x1161, 0x11A7
L_COUNT, V_COUNT, T_COUNT = 19, 21, 28
N_COUNT = V_COUNT * T_COUNT
S_COUNT = L_COUNT * N_COUNT


def chars():
    for cp in range(0x110000):
        if not 0xD800 <= cp < 0xE000:
            yield cp


def build():
    decomp, ccc = {}, {}
    for cp in chars():
        if S_BASE <= cp < S_BASE + S_COUNT:
            continue
        c = chr(cp)
        d = unicodedata.decomposition(c)
        if d and not d.startswith("<"):
            parts = [int(x, 16) for x in d.split()]
            assert len(parts) in (1, 2), (hex(cp), d)
            # A primary composite: NFC keeps it (singletons, non-starter decompositions and the
            # composition exclusions all normalize to something else).
            composes = len(parts) == 2 and unicodedata.normalize("NFC", c) == c
            decomp[cp] = (parts[0], parts[1] if len(parts) == 2 else 0, composes)
        k = unicodedata.combining(c)
        if k:
            ccc[cp] = k
    return decomp, ccc


def adjust_to_tokenizers(decomp, ccc):
    """Gives the code points whose Unicode data is newer than the data of `tokenizers` (its
    unicode-normalization-alignments crate) the crate's behaviour: no decomposition, class 0 or no
    composition, found by asking the library. Returns what was changed, for the header."""
    nfd, nfc_ = normalizers.NFD(), normalizers.NFC()
    changed = {"decomposition": [], "class": [], "composition": []}
    for cp in sorted(decomp):
        c = chr(cp)
        got = nfd.normalize_str(c)
        if got != unicodedata.normalize("NFD", c):
            if got != c:
                sys.exit(f"tokenizers decomposes U+{cp:04X} to {got!r}, Python to something else")
            del decomp[cp]
            changed["decomposition"].append(cp)
    for cp in sorted(ccc):
        c = chr(cp)
        # class k > 1 moves a class-1 mark (U+0334) in front of it; class 1 moves behind U+0301 (230)
        parts = [c, "\u0334"] if ccc[cp] > 1 else ["\u0301", c]
        got = nfd.normalize_str("".join(parts))
        if got == unicodedata.normalize("NFD", "".join(parts)):
            continue
        if got != "".join(unicodedata.normalize("NFD", x) for x in parts):  # not "class 0" either
            sys.exit(f"tokenizers orders U+{cp:04X} in a way no class explains: {got!r}")
        del ccc[cp]
        changed["class"].append(cp)
    for cp, (a, b, comp) in sorted(decomp.items()):
        c = chr(cp)
        if comp and nfc_.normalize_str(unicodedata.normalize("NFD", c)) != c:
            decomp[cp] = (a, b, False)
            changed["composition"].append(cp)
    return changed


def nfc(s, decomp, ccc, pairs):
    """The NFC the C++ code implements, from the tables alone."""
    out = []

    def dec(cp):
        if S_BASE <= cp < S_BASE + S_COUNT:
            i = cp - S_BASE
            out.append(L_BASE + i // N_COUNT)
            out.append(V_BASE + (i % N_COUNT) // T_COUNT)
            if i % T_COUNT:
                out.append(T_BASE + i % T_COUNT)
        elif cp in decomp:
            a, b, _ = decomp[cp]
            dec(a)
            if b:
                dec(b)
        else:
            out.append(cp)

    for ch in s:
        dec(ord(ch))
    # canonical ordering: stable sort of each run of non-starters by class
    i = 0
    while i < len(out):
        if ccc.get(out[i], 0) == 0:
            i += 1
            continue
        j = i
        while j < len(out) and ccc.get(out[j], 0) != 0:
            j += 1
        out[i:j] = sorted(out[i:j], key=lambda c: ccc.get(c, 0))
        i = j
    # canonical composition
    if not out:
        return ""
    res = [out[0]]
    starter = 0 if ccc.get(out[0], 0) == 0 else None
    last = 0 if starter is not None else 256
    for c in out[1:]:
        k = ccc.get(c, 0)
        comp = None
        if starter is not None and (last < k or last == 0):
            a = res[starter]
            if L_BASE <= a < L_BASE + L_COUNT and V_BASE <= c < V_BASE + V_COUNT:
                comp = S_BASE + ((a - L_BASE) * V_COUNT + (c - V_BASE)) * T_COUNT
            elif (S_BASE <= a < S_BASE + S_COUNT and (a - S_BASE) % T_COUNT == 0 and T_BASE < c < T_BASE + T_COUNT):
                comp = a + (c - T_BASE)
            else:
                comp = pairs.get((a, c))
        if comp is not None and (last < k or last == 0):
            res[starter] = comp
            continue
        if k == 0:
            starter = len(res)
        last = k
        res.append(c)
    return "".join(map(chr, res))


def check(decomp, ccc):
    pairs = {(a, b): cp for cp, (a, b, comp) in decomp.items() if comp}
    ref = normalizers.NFC()
    bad = []
    for cp in chars():
        c = chr(cp)
        for s in (c, unicodedata.normalize("NFD", c), "a" + c, c + "\u0301", c + "\u0316\u0301", "\u0301" + c,
                  "e" + c + "\u0301"):
            if nfc(s, decomp, ccc, pairs) != ref.normalize_str(s):
                bad.append((hex(cp), s))
                break
    # canonical reordering with several marks, Hangul LV + T, a composite's own marks
    for s in ["e\u0301\u0323", "e\u0323\u0301", "\u1100\u1161\u11a8", "\uac00\u11a8", "\u0041\u030a\u0323",
              "\u1e9b\u0323", "\u0fb2\u0f80\u0f71", "q\u0307\u0323", "\u00c5\u0316\u0301"]:
        if nfc(s, decomp, ccc, pairs) != ref.normalize_str(s):
            bad.append(("seq", s))
    return bad


def write(decomp, ccc, changed):
    lines = ["// Generated by tests/data/make_hf_nfc_tables.py from Python's unicodedata (Unicode "
             f"{unicodedata.unidata_version}), adjusted",
             "// to the `tokenizers` library's NFC where its older Unicode data differs; do not edit.",
             "// Included by data/hf_tokenizer.cpp (NFC normalizer). Given tokenizers' behaviour (newer than its data):"]
    for what, cps in changed.items():
        text, lead = " ".join(f"U+{cp:04X}" for cp in cps) or "none", f"//   no {what}: "
        while text:
            cut = text[:96].rfind(" ") if len(text) > 96 else len(text)
            lines.append(lead + text[:cut])
            text, lead = text[cut:].strip(), "//     "
    lines += ["",
             "// {code point | kComposes, first, second (0: a singleton)}, sorted by code point.",
             f"const uint32_t kNfcDecomp[][3] = {{"]
    row = []
    for cp in sorted(decomp):
        a, b, comp = decomp[cp]
        row.append(f"{{0x{cp | (COMPOSES if comp else 0):X},0x{a:X},0x{b:X}}}")
        if len(row) == 6:
            lines.append("    " + ",".join(row) + ",")
            row = []
    if row:
        lines.append("    " + ",".join(row) + ",")
    lines.append("};")
    ranges = []
    for cp in sorted(ccc):
        if ranges and ranges[-1][1] == cp - 1 and ranges[-1][2] == ccc[cp]:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp, ccc[cp]])
    lines += ["", "// {first, last, canonical combining class} of the code points whose class is not 0, sorted.",
              "const uint32_t kNfcCcc[][3] = {"]
    for i in range(0, len(ranges), 6):
        lines.append("    " + ",".join(f"{{0x{a:X},0x{b:X},{k}}}" for a, b, k in ranges[i:i + 6]) + ",")
    lines.append("};")
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main():
    decomp, ccc = build()
    changed = adjust_to_tokenizers(decomp, ccc)
    bad = check(decomp, ccc)
    if bad:
        sys.exit(f"tables disagree with tokenizers' NFC on {len(bad)} probes, e.g. {bad[:10]}")
    write(decomp, ccc, changed)
    print(f"wrote {OUT}: {len(decomp)} decompositions, {len(ccc)} combining marks")


if __name__ == "__main__":
    main()

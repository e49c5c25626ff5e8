"""Writes device/src/tokenizer/unicode_tables.rs: the character classes the device's
hand-written pre-tokenizers need, measured on Hugging Face `tokenizers` itself (run by
hand; the output is committed).

Hugging Face `tokenizers` evaluates the pre-tokenizer regular expressions (`\\p{L}`,
`\\p{N}`, `\\s`) with Oniguruma, whose Unicode tables are not those of Python's
`unicodedata` nor of rustc's `char` methods, and its `Digits` pre-tokenizer uses Rust's
`char::is_numeric` of the rustc that built it. So each class is measured by running the
real pre-tokenizer over every code point, which makes the tables exactly those of the
reference, whatever their Unicode versions.

Usage: python scripts/reference/tokenizer_unicode_tables.py [OUT.rs]
"""
import os
import sys

import tokenizers
from tokenizers import Regex, pre_tokenizers

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "../../device/src/tokenizer/unicode_tables.rs")
CODE_POINTS = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]


def members(pre, sep):
    """Code points the pre-tokenizer isolates as one-char pieces. Every code point is
    put between two copies of `sep` (which is not in the class), so a code point in the
    class comes out alone and any other one is glued to its neighbours."""
    text = "".join(sep + chr(c) for c in CODE_POINTS)
    return {ord(p) for p, _ in pre.pre_tokenize_str(text) if len(p) == 1 and p != sep}


def ranges(cps):
    out = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def table(name, cps, doc):
    body = "\n".join(f"    (0x{a:X}, 0x{b:X})," for a, b in ranges(cps))
    return f"/// {doc}\npub const {name}: &[(u32, u32)] = &[\n{body}\n];\n"


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else OUT
    isolated = lambda rx: pre_tokenizers.Split(Regex(rx), behavior="isolated")
    letter = members(isolated(r"\p{L}"), "0")
    number = members(isolated(r"\p{N}"), "a")
    space = members(isolated(r"\s"), "a")
    numeric = members(pre_tokenizers.Digits(individual_digits=True), "a")
    src = [
        "//! Character classes of Hugging Face `tokenizers` "
        f"{tokenizers.__version__}, measured code point by",
        "//! code point by scripts/reference/tokenizer_unicode_tables.py (do not edit).",
        "",
        table("LETTER", letter, "`\\p{L}` in the pre-tokenizer regular expressions (Oniguruma)."),
        table("NUMBER", number, "`\\p{N}` in the pre-tokenizer regular expressions (Oniguruma)."),
        table("NUMERIC", numeric,
              "What the `Digits` pre-tokenizer isolates (`char::is_numeric` of the rustc that built\n"
              "/// `tokenizers`; a few code points more than [`NUMBER`])."),
        table("SPACE", space, "`\\s` in the pre-tokenizer regular expressions (Oniguruma)."),
    ]
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n".join(src))
    print(f"{out}: L {len(letter)}, N {len(number)}, numeric {len(numeric)}, space {len(space)}")


if __name__ == "__main__":
    main()

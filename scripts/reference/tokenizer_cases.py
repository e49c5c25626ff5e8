"""Test strings shared by the tokenizer reference scripts (tokenizer_reference.py,
tokenizer_fixtures.py): hand-picked tricky strings, and fuzzed strings drawn from
character classes where pre-tokenizers and BPE implementations tend to disagree."""
import hashlib
import json
import os
import random
import struct
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "../.."))
# CAP_TOKENIZER_FIXTURES=DIR writes elsewhere (the Rust test reads the same variable),
# and CAP_TOKENIZER_FUZZ=N makes N fuzzed strings instead of 300: a larger local check.
FIXTURES = os.environ.get("CAP_TOKENIZER_FIXTURES", os.path.join(ROOT, "host/tests/fixtures/tokenizer"))
FUZZ_COUNT = int(os.environ.get("CAP_TOKENIZER_FUZZ", "300"))
DATA = os.path.normpath(os.path.join(ROOT, "data"))
WIKI_PATH = os.path.join(DATA, "wikitext-2-raw/wiki.valid.raw")
C4_PATH = os.path.join(DATA, "c4/c4_sample.json")


def wiki():
    """The whole WikiText-2 validation file, as-is (newline translation off)."""
    with open(WIKI_PATH, encoding="utf-8", newline="") as f:
        return f.read()


def write_cases():
    """Writes cases.json (the tricky and fuzzed strings, shared by every ids file) and
    returns the encoder of the `cases` entry of an ids file: the sha256 of cases.json,
    which the Rust tests check, the ids of each tricky string and a digest of the ids of
    each fuzzed one."""
    data = {"tricky": TRICKY, "fuzz": fuzz()}
    raw = json.dumps(data, ensure_ascii=False).encode("utf-8")
    with open(os.path.join(FIXTURES, "cases.json"), "wb") as f:
        f.write(raw)
    digest = hashlib.sha256(raw).hexdigest()
    return lambda encode: {"cases_sha256": digest, "tricky": [encode(s) for s in TRICKY],
                           "fuzz_sha256": [ids_digest(encode(s)) for s in data["fuzz"]]}


def ids_digest(ids):
    """First 16 hex digits of the sha256 of ids as little-endian u32 (for fuzzed
    strings, whose ids are not worth their bytes in the repository)."""
    return hashlib.sha256(struct.pack("<%dI" % len(ids), *ids)).hexdigest()[:16]


def summary(ids, n=512):
    """Count, sha256 of the ids as little-endian u32, first and last `n` ids."""
    raw = struct.pack("<%dI" % len(ids), *ids)
    return {"n_tokens": len(ids), "sha256_u32le": hashlib.sha256(raw).hexdigest(),
            "first": ids[:n], "last": ids[len(ids) - n:] if n else []}


TRICKY = [
    "", " ", "Hello world", "Hello, world!",
    # numbers
    "In 2012, 12345 people", "3.14159 1,234,567.89 -42 +7", "2024-01-01T12:00:00Z 0x1F 1e-9",
    " 1 22 333 4444 55555", "x  2 y\n\n3 z\t 4", "½ ⅔ ² ³ Ⅻ ⅷ", "၁၂၃ ١٢٣ १२३ １２３", "𑷠𑷡 𖿴",
    # contractions
    "don't I'M we'LL they've she'd you're 'tis", "it's 5'10\" O'Neil", "'s's'S ''s", "it'ſ",
    # accents, scripts, composed and decomposed
    "café naïve Ωμέγα", "e\u0301 combining a\u0308\u0323", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗͎", "İstanbul ß ǅ ﬁ",
    "東京 and 北京", "日本語のテキストです。", "Привет мир", "مرحبا بالعالم", "שלום", "नमस्ते दुनिया",
    "ไทย ภาษา", "한국어 텍스트", "¿Qué? ¡Sí!", "ÀÉÎÕÜ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝", "Ᲊ ᲊ ꟋꟌ",
    # emoji
    "emoji 🙂👍🏽 done", "👨\u200d👩\u200d👧\u200d👦 family", "🇫🇷🇩🇪 flags", "🦙🦙 3 33",
    # whitespace
    "a  b   c", "\n\n\nline\n", "\ttab\t\tx", "trailing  ", " leading", "x\r\ny\r\n\r\n",
    "non-breaking\u00a0space\u00a0\u00a0x", "ideographic\u3000space", "A\u2028B\u2029C",
    "x\u0085y\x0bz\x0cw", "zero\u200bwidth\ufeffbom", "  \n  \n", " \t \n x",
    # punctuation, code, markup
    "((nested)) [brackets] {braces}", "--- *** ... !!! ???", "http://example.com/a?b=c&d=e#f",
    "user@example.com", "fn main() { println!(\"hi\"); }", "x=1;y=2;\nreturn x+y", "## Title\n\n* item",
    "<div class=\"x\">text</div>", "UPPER lower MiXeD", "\x00\x01\x7f control", "\ufffd replacement",
    "▁ Ġ literal markers", "<0x41> byte token text", "rare bytes \x04\x06\x1d \U000F1234 \U00100000",
    # special tokens (SmolLM2's, LLaMA's)
    "<|im_start|>user\nhi<|im_end|>", "<|im_start|><|im_end|>", "<|endoftext|><|endoftext|>x",
    "<|im_start", "a<|im_end|>b <|im_end|> c", "<s>hi</s> x", "<s> <s>", "</s></s>", "x<unk>y",
    # long runs
    "a" * 300, " " * 200 + "x", "9" * 100, "=" * 100 + "!", "ab" * 150,
]


def _pool():
    """Characters to fuzz with, by class."""
    letters_new = [0x1C89, 0x1C8A, 0xA7CB, 0xA7CC, 0xA7CD, 0xA7DA, 0xA7DB, 0xA7DC,
                   0x105C0, 0x10D4A, 0x10D6F, 0x11380, 0x16D40]
    return {
        "ascii_letter": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "digit": "0123456789",
        "space": " " * 6 + "\n\n\t\r",
        "apostrophe": "'" * 3 + "sStTmMdDſKİ",
        "punct": ".,;:!?-_()[]{}\"/\\@#$%^&*+=<>|~`",
        "latin": "éèêëàâäôöûüçñßøåæœÉÀÖÜ",
        "combining": "\u0301\u0300\u0308\u0323\u0327\u20dd\u0e31",
        "cjk": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年日本語",
        "other_script": "абвгдежзийклмнопрстуфхцчшщъыьэюяαβγδεζηθικλμνξοπρστυφχψωשלוםمرحباनमस्तेไทย",
        "emoji": ["🙂", "👍", "🏽", "🦙", "🚀", "\u200d", "🇫", "🇷", "❤️", "✅"],
        "odd_space": "\u00a0\u3000\u2028\u2029\u0085\u000b\u000c\u1680\u2000\u202f\u205f\u200b\ufeff\u180e",
        "odd_number": "½²³¹¼Ⅻⅷ၁၂١٢१२１２𑷠𖿴⓵",
        "new_letter": [chr(c) for c in letters_new],
        "marker": ["▁", "Ġ", "Ċ", "<", ">", "|", "<s>", "</s>", "<|im_start|>", "<|im_end|>",
                   "<|endoftext|>", "<0x41>"],
        # Any code point at all (fixed draw), for the character-class tables.
        "any": [chr(c) for c in random.Random(99).sample(range(0x110000), 3000)
                if not 0xD800 <= c <= 0xDFFF],
        "word": ["the", " the", "and", " of", "ing", " don't", " I'll", "ation", " 2024",
                 " = = ", " @-@ ", "\n\n", " @,@ ", "n't", "'re"],
    }


def fuzz(count=None, seed=1234, max_len=40):
    """`count` (default FUZZ_COUNT) random strings, fixed seed, mixing the classes of `_pool`."""
    count = FUZZ_COUNT if count is None else count
    rng = random.Random(seed)
    pool = {k: list(v) for k, v in _pool().items()}
    classes = list(pool)
    out = []
    for _ in range(count):
        # Each string favours a few classes, so runs of one class occur.
        favoured = rng.sample(classes, rng.randint(1, 4))
        n = rng.randint(1, max_len)
        s = "".join(rng.choice(pool[rng.choice(favoured)]) for _ in range(n))
        out.append(unicodedata.normalize("NFC", s) if rng.random() < 0.2 else s)
    return out

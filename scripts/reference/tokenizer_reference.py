"""Reference token ids of SmolLM2-135M-Instruct's tokenizer (run by hand; the output,
host/tests/fixtures/tokenizer/smollm2_wikitext_valid.json, is committed).

The reference is Hugging Face's fast tokenizer of the model: transformers converts the
GGUF's vocabulary and merges, and the pre-tokenizer is set back to the original
SmolLM2 tokenizer.json's `Sequence[Digits(individual_digits=True),
ByteLevel(add_prefix_space=False, use_regex=True)]`. transformers' GGUF conversion
keeps only the `ByteLevel` step; this script also records where that makes a difference.

Evidence for the original rule (printed by this script):
* the vocabulary: of the 49,152 tokens, the only ones holding a `\\p{N}` character are
  single characters, which a tokenizer trained without isolating digits could not
  produce (GPT-2-style BPE learns "Ġ1", "00", "2019", ...);
* llama.cpp maps `tokenizer.ggml.pre = "smollm"` to the expressions `\\p{N}` then
  GPT-2's (llama-vocab.cpp), i.e. digits isolated first;
* llama.cpp's `chkhsh` for "smollm" (convert_hf_to_gguf.py) is reproduced.

Usage: python scripts/reference/tokenizer_reference.py [MODEL.gguf]
"""
import hashlib
import json
import os
import sys

from tokenizers import pre_tokenizers
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenizer_cases import FIXTURES, ids_digest, summary, wiki, write_cases  # noqa: E402
from gpt2_bytes import bytes_to_unicode  # noqa: E402

MODEL = os.path.expanduser("~/.cache/cap/model/SmolLM2-135M-Instruct.Q4_1.gguf")
ORIGINAL_PRE = "Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)]"
# llama.cpp's convert_hf_to_gguf.py: the text whose token ids identify a pre-tokenizer,
# and the hash it lists for "smollm" (ref: HuggingFaceTB/SmolLM-135M).
CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
SMOLLM_CHKHSH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"


def byte_decoder():
    return {c: b for b, c in bytes_to_unicode().items()}


def differing_spans(a, b, token_bytes):
    """Stretches of the text where token lists `a` and `b` differ: between consecutive
    byte offsets at which both have a token boundary."""
    def bounds(ids):
        out, pos = {}, 0
        for i, t in enumerate(ids):
            out[pos] = i
            pos += len(token_bytes(t))
        out[pos] = len(ids)
        return out
    ba, bb = bounds(a), bounds(b)
    common = sorted(set(ba) & set(bb))
    spans = []
    for lo, hi in zip(common, common[1:]):
        x, y = a[ba[lo]:ba[hi]], b[bb[lo]:bb[hi]]
        if x != y:
            text = b"".join(token_bytes(t) for t in x).decode("utf-8", "replace")
            spans.append({"text": text, "original": y, "converted": x})
    return spans


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else MODEL
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    converted = str(tok.backend_tokenizer.pre_tokenizer)
    text = wiki()
    ids_converted = tok.encode(text)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    enc = lambda s: tok.encode(s)  # add_special_tokens=True: what `encode(s, true)` does
    ids = enc(text)

    # Evidence that the original pre-tokenizer isolates digits.
    import unicodedata
    dec = byte_decoder()
    numeric = []
    for t in tok.backend_tokenizer.get_vocab():
        try:
            s = bytes(dec[c] for c in t).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        if any(unicodedata.category(c).startswith("N") for c in s):
            numeric.append(s)
    multi = [s for s in numeric if len(s) > 1]
    chk = hashlib.sha256(str(enc(CHKTXT)).encode()).hexdigest()
    vocab = {i: t for t, i in tok.backend_tokenizer.get_vocab().items()}
    token_bytes = lambda i: bytes(dec[c] for c in vocab[i])
    spans = differing_spans(ids_converted, ids, token_bytes)

    cases = write_cases()
    out = {
        "reference": "Hugging Face tokenizers (transformers GGUF conversion of "
                     f"{os.path.basename(path)}) with the original pre-tokenizer {ORIGINAL_PRE}; "
                     "encode(text) with add_special_tokens=True",
        "source": "wiki.valid.raw (whole file, as-is)",
        **summary(ids),
        **cases(enc),
        "evidence": {
            "tokens_with_a_number": len(numeric),
            "tokens_with_a_number_and_more": multi,
            "chkhsh": chk,
            "chkhsh_is_llama_cpp_smollm": chk == SMOLLM_CHKHSH,
            "transformers_gguf_pre_tokenizer": converted,
            "wiki_n_tokens_with_it": len(ids_converted),
            "wiki_spans_differing_with_it": spans,
            "tricky_or_fuzz_strings_differing_with_it": [],
        },
    }
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    with open(os.path.join(FIXTURES, "cases.json"), encoding="utf-8") as f:
        strings = json.load(f)
    out["evidence"]["tricky_or_fuzz_strings_differing_with_it"] = [
        s for s, want in zip(strings["tricky"], out["tricky"]) if enc(s) != want] + [
        s for s, want in zip(strings["fuzz"], out["fuzz_sha256"]) if ids_digest(enc(s)) != want]
    dest = os.path.join(FIXTURES, "smollm2_wikitext_valid.json")
    with open(dest, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False)
    print(dest, len(ids), "tokens;", json.dumps(out["evidence"], ensure_ascii=False))


if __name__ == "__main__":
    main()

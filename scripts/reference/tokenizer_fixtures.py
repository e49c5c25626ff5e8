"""Small tokenizers and their reference token ids, for cap's tokenizer tests
(host/tests/fixtures/tokenizer/; run by hand, outputs committed). A tokenizer file that
exists is kept (so re-running only refreshes the ids); `--retrain` makes them anew.

* gpt2-bpe.json, smollm-bpe.json, llama3-bpe.json, qwen2-bpe.json: byte-level BPE
  (vocab 800) trained with Hugging Face `tokenizers` on the C4 sample, with GPT-2's
  ByteLevel expression, SmolLM's Digits + ByteLevel, LLaMA-3's and Qwen2's Split.
* spm-bpe.model: SentencePiece BPE (vocab 1000, byte_fallback, split_digits, identity
  normalization, as LLaMA's) trained with `sentencepiece` on the C4 sample.
* spm-bpe.json: its fast tokenizer in LLaMA-1/2's tokenizer.json layout (normalizer
  Prepend("▁") + Replace(" ", "▁"), BOS template), merges as transformers'
  LlamaConverter derives them from the scores.
* spm-bpe-metaspace.json: what transformers 5 makes of spm-bpe.model today (AutoTokenizer
  with tokenizer_class LlamaTokenizer, add_bos_token): a Metaspace pre-tokenizer
  (prepend_scheme "first").
* spm-bpe.gguf: a vocab-only GGUF of spm-bpe.model, as llama.cpp's convert_hf_to_gguf.py
  (`_set_vocab_sentencepiece`) writes it.
* <name>.ids.json: Hugging Face `tokenizers`' ids (encode with add_special_tokens) for the
  whole WikiText-2 validation text (count, sha256 of little-endian u32 ids, first/last
  512) and for the tricky and fuzzed strings of cases.json (tokenizer_cases.py). For spm-bpe, also
  `sentencepiece`'s own ids where they differ from Hugging Face's.

Usage: python scripts/reference/tokenizer_fixtures.py [--retrain]
"""
import json
import os
import shutil
import sys
import tempfile

import gguf
import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tokenizer_cases import C4_PATH, FIXTURES, TRICKY, fuzz, summary, wiki, write_cases  # noqa: E402

LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
BYTE_LEVEL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
FUZZ = fuzz()
CASES = write_cases()


def c4():
    with open(C4_PATH, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def out(name):
    return os.path.join(FIXTURES, name)


def write_ids(name, reference, encode, extra=None):
    ref = {"reference": reference, "source": "wiki.valid.raw (whole file, as-is)",
           **summary(encode(wiki())), **CASES(encode)}
    ref.update(extra or {})
    with open(out(name + ".ids.json"), "w", encoding="utf-8") as f:
        json.dump(ref, f, ensure_ascii=False)
    print(name, ref["n_tokens"], "tokens")


def variants(path, edits):
    """Reference ids of variants of a tokenizer.json: `edits` is {variant: [(json path,
    value), ...]}; the Rust test makes the same edits."""
    with open(path, encoding="utf-8") as f:
        original = json.load(f)
    text = wiki()
    out = {}
    for name, changes in edits.items():
        j = json.loads(json.dumps(original))
        for keys, value in changes:
            node = j
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = value
        t = Tokenizer.from_str(json.dumps(j))
        enc = lambda s, t=t: t.encode(s).ids
        out[name] = {"edit": [[list(k), v] for k, v in changes], **summary(enc(text), 0), **CASES(enc)}
    return {"variants": out}


def byte_level(name, pre, retrain, edits=None):
    path = out(name + ".json")
    if retrain or not os.path.exists(path):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=800, special_tokens=BYTE_LEVEL_SPECIAL,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(c4(), tr)
        tok.save(path)
    tok = Tokenizer.from_file(path)
    write_ids(name, f"Hugging Face tokenizers: Tokenizer.from_file('{name}.json').encode(s).ids",
              lambda s: tok.encode(s).ids, variants(path, edits or {}))


def llama2_style_tokenizer_json(sp):
    """The fast tokenizer transformers' LlamaConverter made of a SentencePiece BPE model
    (LLaMA-2's tokenizer.json layout: BPE with merges from the piece scores, byte
    fallback, normalizer Prepend("▁") + Replace(" ", "▁"), BOS template)."""
    n = sp.vocab_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scored = sorted(((sp.id_to_piece(i), sp.get_score(i)) for i in range(n)), key=lambda x: -x[1])
    merges = []
    for merge, score in scored:
        local = [(merge[:k], merge[k:], score) for k in range(1, len(merge))
                 if merge[:k] in vocab and merge[k:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges = [(a, b) for a, b, _ in sorted(merges, key=lambda x: x[2], reverse=True)]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", sp.bos_id())])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def write_gguf(sp, path):
    """Vocab-only GGUF, as convert_hf_to_gguf.py's _set_vocab_sentencepiece writes it."""
    w = gguf.GGUFWriter(path, "llama")
    toks, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        toks.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        t = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        types.append(int(t))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def sentencepiece(retrain):
    model = out("spm-bpe.model")
    if retrain or not os.path.exists(model):
        with tempfile.TemporaryDirectory() as d:
            txt = os.path.join(d, "c4.txt")
            with open(txt, "w", encoding="utf-8") as f:
                f.write("\n".join(c4()))
            spm.SentencePieceTrainer.train(
                input=txt, model_prefix=os.path.join(d, "spm-bpe"), model_type="bpe", vocab_size=1000,
                byte_fallback=True, split_digits=True, character_coverage=0.9995, add_dummy_prefix=True,
                allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                normalization_rule_name="identity", num_threads=2, minloglevel=2)
            shutil.copy(os.path.join(d, "spm-bpe.model"), model)
    sp = spm.SentencePieceProcessor(model_file=model)
    legacy = out("spm-bpe.json")
    if retrain or not os.path.exists(legacy):
        llama2_style_tokenizer_json(sp).save(legacy)
    metaspace = out("spm-bpe-metaspace.json")
    if retrain or not os.path.exists(metaspace):
        from transformers import AutoTokenizer
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(model, os.path.join(d, "tokenizer.model"))
            with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                           "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
            AutoTokenizer.from_pretrained(d).backend_tokenizer.save(metaspace)
    if retrain or not os.path.exists(out("spm-bpe.gguf")):
        write_gguf(sp, out("spm-bpe.gguf"))

    # LLaMA-1/2 layout: Hugging Face is the reference; sentencepiece itself (which is
    # what llama.cpp and the GGUF path follow: merges by score) is recorded where it
    # differs. sentencepiece does not know special tokens, so strings holding "<s>" or
    # "</s>" are left out of that comparison.
    fast = Tokenizer.from_file(legacy)
    hf = lambda s: fast.encode(s).ids
    sp_ids = lambda s: [sp.bos_id()] + sp.encode(s)
    comparable = lambda s: "<s>" not in s and "</s>" not in s and "<unk>" not in s
    text = wiki()
    disagree = {s: sp_ids(s) for s in TRICKY + FUZZ if comparable(s) and sp_ids(s) != hf(s)}
    write_ids("spm-bpe", "Hugging Face tokenizers: Tokenizer.from_file('spm-bpe.json').encode(s).ids", hf, {
        "sentencepiece_agrees_on_wiki": sp_ids(text) == hf(text),
        "sentencepiece_differs": [[s, ids] for s, ids in disagree.items()],
    })
    print("spm: sentencepiece == HF on wiki:", sp_ids(text) == hf(text), "; differs on", len(disagree), "strings")

    # Modern layout, and its two other Metaspace settings.
    ms_variants = variants(metaspace, {
        "always": [(("pre_tokenizer", "prepend_scheme"), "always")],
        "split": [(("pre_tokenizer", "split"), True)],
    })
    fast_ms = Tokenizer.from_file(metaspace)
    write_ids("spm-bpe-metaspace",
              "Hugging Face tokenizers: Tokenizer.from_file('spm-bpe-metaspace.json').encode(s).ids",
              lambda s: fast_ms.encode(s).ids, ms_variants)


def main():
    retrain = "--retrain" in sys.argv
    os.makedirs(FIXTURES, exist_ok=True)
    byte_level("gpt2-bpe", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), retrain,
               {"add_prefix_space": [(("pre_tokenizer", "add_prefix_space"), True)]})
    byte_level("llama3-bpe", pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), retrain,
               {"ignore_merges": [(("model", "ignore_merges"), True)]})
    byte_level("qwen2-bpe", pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), retrain)
    byte_level("smollm-bpe", pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), retrain)
    sentencepiece(retrain)


if __name__ == "__main__":
    main()

"""Small tokenizers and their reference token ids, for cap's tokenizer tests
(host/tests/fixtures/tokenizer/). Run by hand; outputs are committed.

* gpt2-bpe.json, llama3-bpe.json, qwen2-bpe.json: byte-level BPE tokenizers (vocab 800)
  trained with Hugging Face `tokenizers` on the C4 sample, with GPT-2's ByteLevel regex,
  LLaMA-3's and Qwen2's Split patterns respectively.
* spm-bpe.model: a SentencePiece BPE model (vocab 1000, byte_fallback, split_digits, as
  LLaMA's) trained on the C4 sample; spm-bpe.json is transformers' conversion of it to a
  fast tokenizer; spm-bpe.gguf is a vocab-only GGUF written as llama.cpp's
  convert_hf_to_gguf.py does for SentencePiece vocabularies.
* <name>.ids.json: reference ids from Hugging Face `tokenizers` (the fast tokenizer) for
  the whole WikiText-2 validation file (count, sha256 of u32 LE ids, first/last 256) and
  for a list of tricky strings; for spm, also whether sentencepiece itself agrees.
"""
import hashlib, json, os, struct, tempfile

import sentencepiece as spm
from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers, trainers
from transformers import LlamaTokenizerFast
import gguf

HERE = os.path.dirname(__file__)
OUT = os.path.join(HERE, "../../host/tests/fixtures/tokenizer")
DATA = os.path.join(HERE, "../../../shared/data")
WIKI = open(os.path.join(DATA, "wikitext-2-raw/wiki.valid.raw"), encoding="utf-8").read()
C4 = [json.loads(l)["text"] for l in open(os.path.join(DATA, "c4/c4_sample.json"), encoding="utf-8")]
TRICKY = ["Hello world", "don't I'M we'LL", "In 2012, 12345 people", "3.14159 ½ ⅔ ၁၂",
          "café naïve Ωμέγα", "東京 and 北京", "emoji 🙂👍🏽 done", "e\u0301 combining", "a  b   c",
          "\n\n\nline\n", "\ttab\t", "trailing  ", " leading", "x\r\ny", "((nested)) [brackets]",
          "http://example.com/a?b=c", "UPPER lower MiXeD", "non-breaking\u00a0space", "", " ",
          "ÀÉÎÕÜ", "Привет мир", "مرحبا", "שלום", "नमस्ते", "¿Qué?", "it's 5'10\"", "--- *** ...",
          "zero\u200bwidth", "A\u2028B"]

LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def summary(ids):
    raw = struct.pack("<%dI" % len(ids), *ids)
    return {"n_tokens": len(ids), "sha256_u32le": hashlib.sha256(raw).hexdigest(), "first": ids[:256], "last": ids[-256:]}


def byte_level(name, pre, special=("<|endoftext|>", "<|im_start|>", "<|im_end|>")):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=800, special_tokens=list(special),
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(C4, tr)
    tok.save(os.path.join(OUT, name + ".json"))
    tricky = TRICKY + ["<|im_start|>user\nhi<|im_end|>"]
    ref = {"wiki": summary(tok.encode(WIKI).ids), "tricky": [[s, tok.encode(s).ids] for s in tricky]}
    json.dump(ref, open(os.path.join(OUT, name + ".ids.json"), "w"))


def llama2_style_tokenizer_json(sp):
    """The fast tokenizer transformers' LlamaConverter makes of a SentencePiece BPE model
    (LLaMA-2's tokenizer.json layout: BPE with merges from the piece scores, byte
    fallback, normalizer Prepend("▁") + Replace(" ", "▁"), BOS template)."""
    from tokenizers import normalizers, processors
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


def sentencepiece():
    with tempfile.TemporaryDirectory() as d:
        txt = os.path.join(d, "c4.txt")
        open(txt, "w", encoding="utf-8").write("\n".join(C4))
        spm.SentencePieceTrainer.train(input=txt, model_prefix=os.path.join(OUT, "spm-bpe"), model_type="bpe",
                                       vocab_size=1000, byte_fallback=True, split_digits=True,
                                       character_coverage=0.9995, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
                                       remove_extra_whitespaces=False, normalization_rule_name="identity",
                                       num_threads=2, minloglevel=2)
    os.remove(os.path.join(OUT, "spm-bpe.vocab"))
    model = os.path.join(OUT, "spm-bpe.model")
    sp = spm.SentencePieceProcessor(model_file=model)
    fast = llama2_style_tokenizer_json(sp)
    fast.save(os.path.join(OUT, "spm-bpe.json"))
    hf = lambda s: fast.encode(s).ids
    wiki_hf = hf(WIKI)
    wiki_sp = [sp.bos_id()] + sp.encode(WIKI)
    ref = {"wiki": summary(wiki_hf), "sentencepiece_agrees_on_wiki": wiki_hf == wiki_sp,
           "tricky": [[s, hf(s)] for s in TRICKY],
           "tricky_sentencepiece_agrees": [hf(s) == [sp.bos_id()] + sp.encode(s) for s in TRICKY]}
    json.dump(ref, open(os.path.join(OUT, "spm-bpe.ids.json"), "w"))
    # Vocab-only GGUF, as convert_hf_to_gguf.py's _set_vocab_sentencepiece writes it.
    w = gguf.GGUFWriter(os.path.join(OUT, "spm-bpe.gguf"), "llama")
    toks, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        toks.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        t = 1
        if sp.is_unknown(i): t = 2
        elif sp.is_control(i): t = 3
        elif sp.is_unused(i): t = 5
        elif sp.is_byte(i): t = 6
        types.append(t)
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
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    print("spm: HF == sentencepiece on wiki:", ref["sentencepiece_agrees_on_wiki"],
          "tricky:", sum(ref["tricky_sentencepiece_agrees"]), "/", len(TRICKY))


def main():
    os.makedirs(OUT, exist_ok=True)
    byte_level("gpt2-bpe", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    byte_level("llama3-bpe", pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    byte_level("qwen2-bpe", pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    byte_level("smollm-bpe", pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]))
    sentencepiece()


if __name__ == "__main__":
    main()

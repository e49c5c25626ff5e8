"""Tiny random models for cap's architecture tests (tests/fixtures/tiny/).

Models (all but gemma3: vocab 256, hidden 64, 2 layers, 4 query heads, 2 key/value heads,
head_dim 16, rms_norm_eps 1e-6, rope_theta 10000, max_position_embeddings 256; weights and
biases ~N(0, 0.1), RMSNorm weights 1 + N(0, 0.1); float32; seed = position in the list):

  llama3-scaled  LLaMA, llama3 RoPE scaling (factor 8, low 1, high 4, original 64), untied head
  llama-tied     LLaMA, default RoPE, tied embeddings
  mistral        Mistral, sliding_window 128 (> the 40 test tokens), untied
  qwen2          Qwen2 (q/k/v biases), intermediate 96, untied
  gemma3         Gemma3ForCausalLM, GGUF only (seed 4; see below)

Each but gemma3 is saved with save_pretrained (config.json + model.safetensors); each gets
reference.json: 40 token ids (numpy default_rng(1)) and transformers' float32 logits for
them (eager attention), each value written as the shortest decimal that reads back as
the same float32. llama-tied is also saved as f16 (single file, llama-tied-f16/) and as
bf16 sharded at 50KB (llama-tied-bf16-sharded/, with model.safetensors.index.json); their
references are the model reloaded in float32 from those files (the rounded weights).

llama3-scaled and llama-tied also get a GGUF copy (<name>.gguf in their folder), written
as llama.cpp's convert_hf_to_gguf.py does for LLaMA: standard llama.* keys, F32 tensors,
q/k rows permuted (LlamaModel.permute; n_head = num_key_value_heads for k), no output.weight
when tied, and for llama3 scaling a rope_freqs.weight tensor of per-frequency factors
(LlamaModel.generate_extra_tensors). Plus a minimal byte-level tokenizer: model "gpt2",
pre "default", 256 byte tokens (GPT-2's byte-to-unicode strings, id = byte value), an
empty merges array (llama.cpp refuses a "gpt2" vocabulary without the merges key;
gguf-py's writer cannot write an empty array, so it is written by hand here).

gemma3 (cap refuses Gemma-3 safetensors, so there is no config.json or safetensors, only
gemma3/gemma3.gguf and reference.json): vocab, hidden, heads, head_dim, intermediate 128,
rms_norm_eps and max_position_embeddings as above; 6 layers (layers 0-4 sliding, layer 5 global:
sliding_window_pattern 6), sliding_window 8 (< the 40 test tokens, so the windows slide),
query_pre_attn_scalar 16 (= head_dim: scale 1/sqrt(head_dim), as llama.cpp and cap use),
rope_theta 1e6 global and 10000 local, gelu_pytorch_tanh, tied embeddings, no softcapping;
norm weights (all seven kinds) ~N(0, 0.1), i.e. scales 1 + N(0, 0.1) since Gemma3RMSNorm
multiplies by 1 + w. The GGUF is written as convert_hf_to_gguf.py Gemma3Model does: its
gemma3.* keys (incl. attention.sliding_window, key_length, value_length; it writes no
vocab_size and no rope.dimension_count), F32 tensors with every *norm.weight + 1, q/k rows
not permuted (llama.cpp runs Gemma-3 with NEOX RoPE), no output.weight; the same byte
tokenizer.

Checks (the script fails if one does not hold):
  * llama3 scaling is active (logits differ from the same weights with default RoPE) and
    rope_freqs.weight equals transformers' own llama3 inv_freq ratio;
  * each GGUF reads back with gguf.GGUFReader with the keys and exact tensor bytes written;
  * transformers loads each GGUF (from a folder holding only the .gguf) and reproduces
    the logits within 1e-5 -- for llama3-scaled against the same weights with default
    RoPE, since transformers' GGUF loader ignores rope_freqs.weight;
  * an independent float64 numpy forward pass that reads the GGUF tensors and applies
    llama.cpp's semantics (adjacent-pair RoPE on the permuted q/k, angles divided by
    rope_freqs) reproduces reference.json within 1e-4;
  * reference.json parses back to exactly the float32 logits;
  * gemma3: the window is active (the same weights with a window of 256 give other
    logits); GGUFReader reads back every key and tensor; a float64 numpy forward pass with
    llama.cpp's gemma3 semantics on the GGUF tensors reproduces reference.json within
    1e-4; transformers loads the GGUF and reproduces the logits within 1e-5 once
    query_pre_attn_scalar=16 is passed (GGUF has no key for it, and without it transformers
    takes Gemma3TextConfig's 256; that model is compared with the same weights at 256).

usage: python scripts/reference/make_tiny_models.py [--out DIR]   (run by hand; outputs are committed)
"""
import argparse, json, math, os, shutil, sys, tempfile

import numpy as np
import torch
import gguf
import transformers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt2_bytes import bytes_to_unicode  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.normpath(os.path.join(HERE, "../../tests/fixtures/tiny"))
ATTN = "eager"
ROPE_THETA = 10000.0
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              max_position_embeddings=256)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": ROPE_THETA}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": ROPE_THETA}
TOKENS = [int(t) for t in np.random.default_rng(1).integers(0, 256, 40)]
GENERATED = ["llama3-scaled", "llama-tied", "llama-tied-f16", "llama-tied-bf16-sharded", "mistral", "qwen2",
             "gemma3"]


def configs():
    # In transformers 5 `rope_scaling` became `rope_parameters` (which also carries rope_theta).
    return {
        "llama3-scaled": LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters=dict(LLAMA3)),
        "llama-tied": LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters=dict(DEFAULT_ROPE)),
        "mistral": MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=128,
                                 rope_parameters=dict(DEFAULT_ROPE)),
        "qwen2": Qwen2Config(**{**COMMON, "intermediate_size": 96}, tie_word_embeddings=False,
                             rope_parameters=dict(DEFAULT_ROPE)),
    }


def build(cfg, seed, norm_mean=1.0):
    """Random model: weights and biases ~N(0, 0.1), norm weights norm_mean + N(0, 0.1)."""
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation=ATTN).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():  # tied: the shared tensor appears once
            if "norm" in name:
                p.copy_(norm_mean + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))  # weights and biases alike
    return m


def save(m, d, **kw):
    m.save_pretrained(d, safe_serialization=True, **kw)
    # Only config.json and the weights are fixtures; the generation defaults are noise.
    g = os.path.join(d, "generation_config.json")
    if os.path.exists(g):
        os.remove(g)


def logits(m):
    with torch.no_grad():
        return m(torch.tensor([TOKENS])).logits[0].float()


def f32_json(rows):
    """Logits as JSON numbers: the shortest decimal that reads back as the same float32."""
    return "[" + ",".join("[" + ",".join(str(np.float32(v)) for v in row) + "]" for row in rows) + "]"


def save_ref(d, m):
    lg = logits(m).numpy().astype(np.float32)
    assert np.isfinite(lg).all()
    text = ('{"tokens": %s, "attn_implementation": "%s", "dtype": "float32", "torch": "%s", '
            '"transformers": "%s", "logits": %s}\n'
            % (json.dumps(TOKENS), ATTN, torch.__version__, transformers.__version__, f32_json(lg)))
    back = np.array(json.loads(text)["logits"], dtype=np.float64).astype(np.float32)
    assert back.shape == lg.shape and (back.view(np.uint32) == lg.view(np.uint32)).all(), "logits do not round-trip"
    with open(os.path.join(d, "reference.json"), "w") as f:
        f.write(text)
    return lg


def permute(w, n_head):
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg):
    # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (float32 torch arithmetic)
    rp = cfg.rope_parameters
    base, dim = rp.get("rope_theta", 10000.0), cfg.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rp.get("factor", 8.0)
    low_freq_factor = rp.get("low_freq_factor", 1.0)
    high_freq_factor = rp.get("high_freq_factor", 4.0)
    old_context_len = rp.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    assert low_freq_wavelen != high_freq_wavelen
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


class Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write an empty array (GGUF allows it; gguf-py refuses)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == gguf.GGUFValueType.ARRAY and len(val) == 0 and sub_type is not None:
            out = self._pack("I", vtype) if add_vtype else b""
            return out + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def byte_tokens():
    # The string a byte-level BPE vocabulary uses for each byte, in byte order.
    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(path, name, m, cfg):
    """Returns (kv dict, tensor dict) as written."""
    kv = {
        "general.architecture": "llama", "general.type": "model", "general.name": f"tiny {name}",
        "general.file_type": int(gguf.LlamaFileType.ALL_F32), "general.quantization_version": gguf.GGML_QUANT_VERSION,
        "llama.context_length": cfg.max_position_embeddings, "llama.embedding_length": cfg.hidden_size,
        "llama.block_count": cfg.num_hidden_layers, "llama.feed_forward_length": cfg.intermediate_size,
        "llama.rope.dimension_count": cfg.head_dim, "llama.attention.head_count": cfg.num_attention_heads,
        "llama.attention.head_count_kv": cfg.num_key_value_heads,
        "llama.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        "llama.rope.freq_base": cfg.rope_parameters["rope_theta"], "llama.vocab_size": cfg.vocab_size,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": byte_tokens(), "tokenizer.ggml.token_type": [int(gguf.TokenType.NORMAL)] * 256,
        "tokenizer.ggml.merges": [],
    }
    w = Writer(path, "llama")
    w.add_type(kv["general.type"])
    w.add_name(kv["general.name"])
    w.add_file_type(kv["general.file_type"])
    w.add_quantization_version(kv["general.quantization_version"])
    w.add_context_length(kv["llama.context_length"])
    w.add_embedding_length(kv["llama.embedding_length"])
    w.add_block_count(kv["llama.block_count"])
    w.add_feed_forward_length(kv["llama.feed_forward_length"])
    w.add_rope_dimension_count(kv["llama.rope.dimension_count"])
    w.add_head_count(kv["llama.attention.head_count"])
    w.add_head_count_kv(kv["llama.attention.head_count_kv"])
    w.add_layer_norm_rms_eps(kv["llama.attention.layer_norm_rms_epsilon"])
    w.add_rope_freq_base(kv["llama.rope.freq_base"])
    w.add_vocab_size(kv["llama.vocab_size"])
    w.add_tokenizer_model(kv["tokenizer.ggml.model"])
    w.add_tokenizer_pre(kv["tokenizer.ggml.pre"])
    w.add_token_list(kv["tokenizer.ggml.tokens"])
    w.add_token_types(kv["tokenizer.ggml.token_type"])
    w.add_key_value("tokenizer.ggml.merges", [], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)

    sd = {k: v.detach().float().numpy() for k, v in m.state_dict().items()}
    tensors = {}
    if cfg.rope_parameters.get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = llama3_rope_factors(cfg)
    tensors["token_embd.weight"] = sd["model.embed_tokens.weight"]
    tensors["output_norm.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        for hf, gg in NAMES.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = permute(t, cfg.num_attention_heads)
            if gg == "attn_k":
                t = permute(t, cfg.num_key_value_heads)
            tensors[f"blk.{i}.{gg}.weight"] = np.ascontiguousarray(t, dtype=np.float32)
    for k, t in tensors.items():
        w.add_tensor(k, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return kv, tensors


def check_gguf_readback(path, kv, tensors):
    r = gguf.GGUFReader(path)
    for k, want in kv.items():
        f = r.fields.get(k)
        assert f is not None, f"{path}: key {k} missing"
        if k == "tokenizer.ggml.merges":
            # GGUFReader lists no element type for an empty array; read it from the raw parts.
            assert f.types[0] == gguf.GGUFValueType.ARRAY and len(f.data) == 0, k
            assert int(f.parts[3][0]) == gguf.GGUFValueType.STRING and int(f.parts[4][0]) == 0, k
            continue
        got = f.contents()
        if isinstance(want, float):
            assert abs(got - want) <= 1e-7 * abs(want), (k, got, want)
        else:
            assert got == want, (k, got if not isinstance(got, list) else got[:5], want if not isinstance(want, list) else want[:5])
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(tensors), (sorted(got), sorted(tensors))
    for k, t in tensors.items():
        g = got[k]
        assert g.tensor_type == gguf.GGMLQuantizationType.F32, k
        assert list(g.shape) == list(reversed(t.shape)), (k, g.shape, t.shape)  # GGUF ne order
        assert np.array_equal(np.asarray(g.data).reshape(t.shape).view(np.uint32), t.view(np.uint32)), k
    return {t.name: np.asarray(t.data).reshape(tensors[t.name].shape) for t in r.tensors}, r


def llamacpp_forward(t, r, tokens):
    """float64 forward pass from GGUF tensors with llama.cpp's LLaMA semantics."""
    f = lambda k: r.fields[k].contents()
    n_layer, n_head, n_kv = f("llama.block_count"), f("llama.attention.head_count"), f("llama.attention.head_count_kv")
    eps, base, n_rot = f("llama.attention.layer_norm_rms_epsilon"), f("llama.rope.freq_base"), f("llama.rope.dimension_count")
    T = {k: v.astype(np.float64) for k, v in t.items()}
    x = T["token_embd.weight"][tokens]
    n, d = x.shape
    hd = d // n_head
    ff = T.get("rope_freqs.weight", np.ones(n_rot // 2))
    theta = np.arange(n)[:, None] * base ** (-np.arange(0, n_rot, 2) / n_rot)[None, :] / ff[None, :]
    cos, sin = np.cos(theta), np.sin(theta)

    def rope(v):  # [n, heads, hd]; NORM mode: rotate adjacent pairs (2i, 2i+1)
        v = v.copy()
        a, b = v[..., 0:n_rot:2].copy(), v[..., 1:n_rot:2].copy()
        v[..., 0:n_rot:2] = a * cos[:, None, :] - b * sin[:, None, :]
        v[..., 1:n_rot:2] = a * sin[:, None, :] + b * cos[:, None, :]
        return v

    def norm(v, wt):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * wt

    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(n_layer):
        p = lambda s: T[f"blk.{i}.{s}.weight"]
        h = norm(x, p("attn_norm"))
        q = rope((h @ p("attn_q").T).reshape(n, n_head, hd))
        k = rope((h @ p("attn_k").T).reshape(n, n_kv, hd))
        v = (h @ p("attn_v").T).reshape(n, n_kv, hd)
        out = np.empty((n, n_head, hd))
        for hh in range(n_head):
            kvh = hh // (n_head // n_kv)
            s = q[:, hh] @ k[:, kvh].T / math.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (s / s.sum(-1, keepdims=True)) @ v[:, kvh]
        x = x + out.reshape(n, d) @ p("attn_output").T
        h = norm(x, p("ffn_norm"))
        g = h @ p("ffn_gate").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ p("ffn_up").T)) @ p("ffn_down").T
    x = norm(x, T["output_norm.weight"])
    return x @ T.get("output.weight", T["token_embd.weight"]).T


# Gemma-3 (GGUF only: cap refuses gemma3 safetensors). Six layers so that layers 0-4 are
# local and layer 5 is global (sliding_window_pattern 6, which llama.cpp also fixes), a
# window of 8 tokens so that the local layers' windows slide over the 40 test tokens, and
# query_pre_attn_scalar = head_dim so that the attention scale is 1/sqrt(head_dim), which
# is what llama.cpp (and cap) use for every Gemma-3 size but 27B.
GEMMA3_SEED = 4  # after the four models of configs()
GEMMA3_LOCAL_THETA = 10000.0  # rope_local_base_freq; llama.cpp fixes it for gemma3
GEMMA3_GLOBAL_THETA = 1e6


def gemma3_config(query_pre_attn_scalar=16):
    return Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=query_pre_attn_scalar, sliding_window=8,
        sliding_window_pattern=6, rms_norm_eps=1e-6, max_position_embeddings=256, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None, attn_logit_softcapping=None,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": GEMMA3_GLOBAL_THETA},
                         "sliding_attention": {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_THETA}})


# Hugging Face name -> GGUF name (gguf-py's tensor map for MODEL_ARCH.GEMMA3).
GEMMA3_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate",
                "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gemma3_gguf(path, name, m, cfg):
    """As convert_hf_to_gguf.py Gemma3Model: its set_gguf_parameters keys (no vocab_size,
    no rope.dimension_count: it writes neither), norm weights + 1 (Gemma3RMSNorm scales by
    1 + w), q/k rows as they are (llama.cpp's gemma3 graph uses NEOX, i.e. half-split, RoPE
    like Hugging Face), tied head. Returns (kv dict, tensor dict) as written."""
    a = "gemma3"
    kv = {
        "general.architecture": a, "general.type": "model", "general.name": f"tiny {name}",
        "general.file_type": int(gguf.LlamaFileType.ALL_F32), "general.quantization_version": gguf.GGML_QUANT_VERSION,
        f"{a}.context_length": cfg.max_position_embeddings, f"{a}.embedding_length": cfg.hidden_size,
        f"{a}.block_count": cfg.num_hidden_layers, f"{a}.feed_forward_length": cfg.intermediate_size,
        f"{a}.attention.head_count": cfg.num_attention_heads,
        f"{a}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        f"{a}.attention.key_length": cfg.head_dim, f"{a}.attention.value_length": cfg.head_dim,
        f"{a}.rope.freq_base": cfg.rope_parameters["full_attention"]["rope_theta"],
        f"{a}.attention.sliding_window": cfg.sliding_window,
        f"{a}.attention.head_count_kv": cfg.num_key_value_heads,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": byte_tokens(), "tokenizer.ggml.token_type": [int(gguf.TokenType.NORMAL)] * 256,
        "tokenizer.ggml.merges": [],
    }
    w = Writer(path, a)
    w.add_type(kv["general.type"])
    w.add_name(kv["general.name"])
    w.add_quantization_version(kv["general.quantization_version"])
    w.add_context_length(kv[f"{a}.context_length"])
    w.add_embedding_length(kv[f"{a}.embedding_length"])
    w.add_block_count(kv[f"{a}.block_count"])
    w.add_feed_forward_length(kv[f"{a}.feed_forward_length"])
    w.add_head_count(kv[f"{a}.attention.head_count"])
    w.add_layer_norm_rms_eps(kv[f"{a}.attention.layer_norm_rms_epsilon"])
    w.add_key_length(kv[f"{a}.attention.key_length"])
    w.add_value_length(kv[f"{a}.attention.value_length"])
    w.add_file_type(kv["general.file_type"])
    w.add_rope_freq_base(kv[f"{a}.rope.freq_base"])
    w.add_sliding_window(kv[f"{a}.attention.sliding_window"])
    w.add_head_count_kv(kv[f"{a}.attention.head_count_kv"])
    w.add_tokenizer_model(kv["tokenizer.ggml.model"])
    w.add_tokenizer_pre(kv["tokenizer.ggml.pre"])
    w.add_token_list(kv["tokenizer.ggml.tokens"])
    w.add_token_types(kv["tokenizer.ggml.token_type"])
    w.add_key_value("tokenizer.ggml.merges", [], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)

    sd = {k: v.detach().float().numpy() for k, v in m.state_dict().items()}
    assert cfg.tie_word_embeddings  # no output.weight: llama.cpp reuses token_embd
    if "lm_head.weight" in sd:  # the state dict may list the tied tensor under both names
        assert np.array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    shift = lambda k, t: t + np.float32(1.0) if k.endswith("norm.weight") else t  # float32 add, as torch's
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"],
               "output_norm.weight": shift("model.norm.weight", sd["model.norm.weight"])}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in GEMMA3_NAMES.items():
            k = f"model.layers.{i}.{hf}.weight"
            tensors[f"blk.{i}.{gg}.weight"] = np.ascontiguousarray(shift(k, sd[k]), dtype=np.float32)
    for k, t in tensors.items():
        assert t.dtype == np.float32, k
        w.add_tensor(k, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return kv, tensors


def gemma3_llamacpp_forward(t, r, tokens):
    """float64 forward pass from GGUF tensors with llama.cpp's gemma3 semantics: embedding
    times sqrt(n_embd); norms multiply by the stored weight (the +1 is in it); per-head q/k
    RMSNorm; NEOX RoPE (halves rotated together) at rope.freq_base in global layers and
    10000 in local ones; every 6th layer global, the others mask keys with q - k >= window;
    scores scaled by 1/sqrt(key_length); norms after attention and after the MLP;
    GELU (tanh) gate."""
    f = lambda k: r.fields[k].contents()
    a = "gemma3"
    n_layer, n_head, n_kv = f(f"{a}.block_count"), f(f"{a}.attention.head_count"), f(f"{a}.attention.head_count_kv")
    eps, hd = f(f"{a}.attention.layer_norm_rms_epsilon"), f(f"{a}.attention.key_length")
    window, global_base = f(f"{a}.attention.sliding_window"), f(f"{a}.rope.freq_base")
    T = {k: v.astype(np.float64) for k, v in t.items()}
    n = len(tokens)
    d = T["token_embd.weight"].shape[1]
    x = T["token_embd.weight"][tokens] * math.sqrt(d)

    def rope(v, base):  # [n, heads, hd]; NEOX mode: rotate (i, i + hd/2)
        theta = np.arange(n)[:, None] * base ** (-np.arange(0, hd, 2) / hd)[None, :]
        cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        a_, b_ = v[..., : hd // 2], v[..., hd // 2:]
        return np.concatenate([a_ * cos - b_ * sin, a_ * sin + b_ * cos], axis=-1)

    def norm(v, wt):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * wt

    def gelu_tanh(v):
        return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

    q_idx, k_idx = np.arange(n)[:, None], np.arange(n)[None, :]
    causal = np.where(k_idx > q_idx, -np.inf, 0.0)
    local = np.where((k_idx > q_idx) | (q_idx - k_idx >= window), -np.inf, 0.0)
    for i in range(n_layer):
        p = lambda s: T[f"blk.{i}.{s}.weight"]
        is_local = (i + 1) % 6 != 0
        base, mask = (GEMMA3_LOCAL_THETA, local) if is_local else (global_base, causal)
        h = norm(x, p("attn_norm"))
        q = rope(norm((h @ p("attn_q").T).reshape(n, n_head, hd), p("attn_q_norm")), base)
        k = rope(norm((h @ p("attn_k").T).reshape(n, n_kv, hd), p("attn_k_norm")), base)
        v = (h @ p("attn_v").T).reshape(n, n_kv, hd)
        out = np.empty((n, n_head, hd))
        for hh in range(n_head):
            kvh = hh // (n_head // n_kv)
            s = q[:, hh] @ k[:, kvh].T / math.sqrt(hd) + mask
            s = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (s / s.sum(-1, keepdims=True)) @ v[:, kvh]
        x = x + norm(out.reshape(n, n_head * hd) @ p("attn_output").T, p("post_attention_norm"))
        h = norm(x, p("ffn_norm"))
        y = (gelu_tanh(h @ p("ffn_gate").T) * (h @ p("ffn_up").T)) @ p("ffn_down").T
        x = x + norm(y, p("post_ffw_norm"))
    x = norm(x, T["output_norm.weight"])
    return x @ T["token_embd.weight"].T


def make_gemma3(out):
    name = "gemma3"
    cfg = gemma3_config()
    assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"], cfg.layer_types
    # Gemma3RMSNorm scales by (1 + w): w ~ N(0, 0.1) gives the same effective scales,
    # 1 + N(0, 0.1), as the other models' norms.
    m = build(cfg, GEMMA3_SEED, norm_mean=0.0)
    assert type(m).__name__ == "Gemma3ForCausalLM", type(m)
    assert m.model.layers[0].self_attn.sliding_window == 8 and m.model.layers[5].self_attn.sliding_window is None
    assert m.model.layers[0].self_attn.scaling == 0.25
    d = os.path.join(out, name)
    os.makedirs(d)
    ref = save_ref(d, m)

    # The window matters: the same weights with a window wider than the text differ.
    wide = build(gemma3_config(), GEMMA3_SEED, norm_mean=0.0)
    wide.config.sliding_window = 256
    for layer in wide.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = 256
    wide.load_state_dict(m.state_dict())
    diff = (logits(wide) - torch.from_numpy(ref)).abs().max().item()
    assert diff > 1e-3, f"the sliding window does not change the logits ({diff})"
    print(f"{name}: the window of 8 is active (max logit change vs a window of 256: {diff:.3f})")

    g = os.path.join(d, name + ".gguf")
    kv, tensors = write_gemma3_gguf(g, name, m, cfg)
    t, reader = check_gguf_readback(g, kv, tensors)
    print(f"{name}.gguf: GGUFReader read back {len(kv)} keys and {len(tensors)} tensors exactly")
    lc = gemma3_llamacpp_forward(t, reader, TOKENS)
    err = np.abs(lc - ref).max()
    print(f"{name}.gguf: numpy forward with llama.cpp semantics vs reference: max diff {err:.2e}")
    assert err < 1e-4, err

    # transformers' GGUF loader reads no query_pre_attn_scalar (GGUF has no such key) and
    # takes Gemma3TextConfig's default of 256: scores scaled by 1/16, not 1/4.
    with tempfile.TemporaryDirectory() as tmp:  # only the GGUF, so no config.json is used
        shutil.copy(g, tmp)
        load = lambda **kw: AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=name + ".gguf", dtype=torch.float32, attn_implementation=ATTN, **kw).eval()
        plain = load()
        fixed = load(query_pre_attn_scalar=cfg.query_pre_attn_scalar)
    assert plain.config.query_pre_attn_scalar == 256, plain.config.query_pre_attn_scalar
    assert plain.config.tie_word_embeddings and plain.config.sliding_window == cfg.sliding_window
    assert plain.config.layer_types == cfg.layer_types
    as256 = build(gemma3_config(query_pre_attn_scalar=256), GEMMA3_SEED, norm_mean=0.0)
    as256.load_state_dict(m.state_dict())
    d256 = (logits(plain) - logits(as256)).abs().max().item()
    dref = (logits(plain) - torch.from_numpy(ref)).abs().max().item()
    dfix = (logits(fixed) - torch.from_numpy(ref)).abs().max().item()
    print(f"{name}.gguf: transformers' GGUF loader (query_pre_attn_scalar defaults to 256) vs the same weights "
          f"with 256: max logit diff {d256:.2e}; vs reference: {dref:.3f}")
    print(f"{name}.gguf: transformers' GGUF loader with query_pre_attn_scalar=16 passed vs reference: "
          f"max logit diff {dfix:.2e}")
    assert d256 < 1e-5 and dfix < 1e-5, (d256, dfix)
    print(name, "saved")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args()
    torch.set_num_threads(2)
    os.makedirs(a.out, exist_ok=True)
    for name in GENERATED:  # leave README.md and anything else alone
        shutil.rmtree(os.path.join(a.out, name), ignore_errors=True)
    cfgs = configs()
    for seed, (name, cfg) in enumerate(cfgs.items()):
        m = build(cfg, seed)
        d = os.path.join(a.out, name)
        save(m, d)
        ref = save_ref(d, m)
        saved = json.load(open(os.path.join(d, "config.json")))
        assert saved["rope_parameters"]["rope_theta"] == ROPE_THETA, saved["rope_parameters"]

        plain = None
        if name == "llama3-scaled":
            assert saved["rope_parameters"]["rope_type"] == "llama3", saved["rope_parameters"]
            plain_cfg = LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters=dict(DEFAULT_ROPE))
            plain = build(plain_cfg, seed)
            plain.load_state_dict(m.state_dict())
            diff = (logits(plain) - logits(m)).abs().max().item()
            assert diff > 1e-3, "llama3 scaling is not active"
            inv_default = plain.model.rotary_emb.inv_freq.double()
            inv_llama3 = m.model.rotary_emb.inv_freq.double()
            factors = torch.tensor(llama3_rope_factors(cfg), dtype=torch.float64)
            assert torch.allclose(inv_default / factors, inv_llama3, rtol=1e-6, atol=0), (inv_default / factors, inv_llama3)
            print(f"{name}: llama3 scaling active (max logit change vs default RoPE {diff:.3f}); "
                  f"rope factors {[round(float(x), 4) for x in factors]}")

        if name in ("llama-tied", "llama3-scaled"):
            g = os.path.join(d, name + ".gguf")
            kv, tensors = write_gguf(g, name, m, cfg)
            t, reader = check_gguf_readback(g, kv, tensors)
            print(f"{name}.gguf: GGUFReader read back {len(kv)} keys and {len(tensors)} tensors exactly")
            lc = llamacpp_forward(t, reader, TOKENS)
            err = np.abs(lc - ref).max()
            assert err < 1e-4, err
            print(f"{name}.gguf: numpy forward with llama.cpp semantics vs reference: max diff {err:.2e}")
            with tempfile.TemporaryDirectory() as tmp:  # only the GGUF, so config.json is not used
                shutil.copy(g, tmp)
                back = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=name + ".gguf", dtype=torch.float32,
                                                            attn_implementation=ATTN).eval()
            want = logits(plain if plain is not None else m)
            diff = (logits(back) - want).abs().max().item()
            what = "same weights with default RoPE (it ignores rope_freqs.weight)" if plain is not None else "reference"
            print(f"{name}.gguf: transformers' GGUF loader vs {what}: max logit diff {diff:.2e}")
            assert diff < 1e-5, diff
            if plain is not None:
                print(f"{name}.gguf: transformers' GGUF loader vs reference (scaled): "
                      f"{(logits(back) - torch.from_numpy(ref)).abs().max().item():.3f}")
            assert getattr(back.config, "tie_word_embeddings", None) == cfg.tie_word_embeddings or name != "llama-tied"

        if name == "llama-tied":
            for dtype, suffix, shard in ((torch.float16, "f16", None), (torch.bfloat16, "bf16-sharded", "50KB")):
                d2 = os.path.join(a.out, f"{name}-{suffix}")
                low = build(cfg, seed)
                low.load_state_dict(m.state_dict())
                low = low.to(dtype)
                kw = {"max_shard_size": shard} if shard else {}
                save(low, d2, **kw)
                if shard:
                    idx = json.load(open(os.path.join(d2, "model.safetensors.index.json")))
                    assert len(set(idx["weight_map"].values())) >= 2
                # Reload in f32 (not low.float(): that would keep bf16-rounded RoPE buffers).
                save_ref(d2, AutoModelForCausalLM.from_pretrained(d2, dtype=torch.float32, attn_implementation=ATTN).eval())
                print(f"{name}-{suffix} saved")
        print(name, "saved")
    make_gemma3(a.out)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(a.out) for f in fs)
    print(f"{a.out}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

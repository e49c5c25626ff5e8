"""Tiny random models for cap's architecture tests (tests/fixtures/tiny/).

For llama (llama3 RoPE scaling, untied head), llama (tied), mistral and qwen2 (q/k/v
biases): a random float32 model (seed 0, weights ~N(0, 0.1)) saved with
save_pretrained (config.json + model.safetensors), plus reference.json holding 40 token
ids and transformers' float32 logits for them. The tied llama is also saved as f16
(single file) and bf16 (sharded, with model.safetensors.index.json); their references
are the f32 model with the rounded weights. llama-tied and llama3 also get a GGUF copy
written like llama.cpp's convert_hf_to_gguf.py (q/k rows permuted, rope_freqs.weight for
llama3 scaling), checked by loading it back with transformers.

usage: python make_tiny_models.py   (run by hand; outputs are committed)
"""
import json, math, os, shutil

import numpy as np
import torch
import gguf
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

OUT = os.path.join(os.path.dirname(__file__), "../../tests/fixtures/tiny")
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
              max_position_embeddings=256)
TOKENS = [int(t) for t in np.random.default_rng(1).integers(0, 256, 40)]


def build(cfg, seed):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return m


def logits(m):
    with torch.no_grad():
        return m(torch.tensor([TOKENS])).logits[0].float()


def save_ref(d, m):
    json.dump({"tokens": TOKENS, "logits": logits(m).tolist(), "attn_implementation": "eager",
               "torch": torch.__version__}, open(os.path.join(d, "reference.json"), "w"))


def permute(w, n_head):
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, m, cfg, llama3=None):
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([bytes([b]).decode("latin-1") for b in range(256)])
    w.add_token_types([1] * 256)
    sd = {k: v.detach().float().numpy() for k, v in m.state_dict().items()}
    if llama3:
        # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
        base, dim = 10000.0, cfg.head_dim
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, lo, hi, old = llama3["factor"], llama3["low_freq_factor"], llama3["high_freq_factor"], llama3["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        rope_factors = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < high_wl:
                rope_factors.append(1)
            elif wl > low_wl:
                rope_factors.append(factor)
            else:
                smooth = (old / wl - lo) / (hi - lo)
                rope_factors.append(1 / ((1 - smooth) / factor + smooth))
        w.add_tensor("rope_freqs.weight", np.array(rope_factors, dtype=np.float32))
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = permute(t, cfg.num_attention_heads)
            if gg == "attn_k":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    models = {
        "llama3-scaled": LlamaConfig(**COMMON, tie_word_embeddings=False, rope_parameters=llama3),
        "llama-tied": LlamaConfig(**COMMON, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        "mistral": MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=128),
        "qwen2": Qwen2Config(**{**COMMON, "intermediate_size": 96}, tie_word_embeddings=False),
    }
    for seed, (name, cfg) in enumerate(models.items()):
        m = build(cfg, seed)
        if name == "llama3-scaled":
            default = LlamaConfig(**COMMON, tie_word_embeddings=False)
            ref = build(default, seed)
            ref.load_state_dict(m.state_dict())
            assert (logits(ref) - logits(m)).abs().max() > 1e-3, "llama3 scaling is not active"
        d = os.path.join(OUT, name)
        m.save_pretrained(d, safe_serialization=True)
        save_ref(d, m)
        if name in ("llama-tied", "llama3-scaled"):
            g = os.path.join(d, name + ".gguf")
            write_gguf(g, m, cfg, llama3 if name == "llama3-scaled" else None)
            back = AutoModelForCausalLM.from_pretrained(d, gguf_file=name + ".gguf", dtype=torch.float32).eval()
            diff = (logits(back) - logits(m)).abs().max().item()
            print(f"{name}: transformers reading the GGUF back: max logit diff {diff:.2e}")
        if name == "llama-tied":
            for dtype, suffix, shard in ((torch.float16, "f16", None), (torch.bfloat16, "bf16-sharded", "50KB")):
                d2 = os.path.join(OUT, f"{name}-{suffix}")
                low = build(cfg, seed)
                low.load_state_dict(m.state_dict())
                low = low.to(dtype)
                kw = {"max_shard_size": shard} if shard else {}
                low.save_pretrained(d2, safe_serialization=True, **kw)
                # Reload in f32 (not low.float(): that would keep bf16-rounded RoPE buffers).
                save_ref(d2, AutoModelForCausalLM.from_pretrained(d2, dtype=torch.float32, attn_implementation="eager").eval())
        print(name, "saved")


if __name__ == "__main__":
    main()

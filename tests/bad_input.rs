//! The bad-input catalogue: every malformed input gives a one-line error that names the
//! problem and the file, a non-zero exit, and no panic.

mod common;

use common::{assert_clean_failure, tiny_llama_gguf};
use std::path::Path;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.display().to_string()
}

#[test]
fn missing_model_file() {
    let d = tempfile::tempdir().unwrap();
    let text = write(d.path(), "t.txt", b"hello world");
    assert_clean_failure(
        &["eval", "--model", "/no/such/model.gguf", "--text", &text],
        &["/no/such/model.gguf"],
    );
    assert_clean_failure(
        &["inspect", "/no/such/model.gguf"],
        &["/no/such/model.gguf"],
    );
}

#[test]
fn missing_text_file() {
    let d = tempfile::tempdir().unwrap();
    let m = write(
        d.path(),
        "m.gguf",
        &tiny_llama_gguf("llama", 0, 8 * 256 * 4),
    );
    assert_clean_failure(
        &["eval", "--model", &m, "--text", "/no/such/text.raw"],
        &["/no/such/text.raw"],
    );
}

#[test]
fn truncated_gguf_at_many_cut_points() {
    let d = tempfile::tempdir().unwrap();
    let full = tiny_llama_gguf("llama", 0, 8 * 256 * 4);
    let text = write(d.path(), "t.txt", b"hello world");
    for cut in [0, 3, 10, 30, 200, full.len() / 2, full.len() - 1] {
        let m = write(d.path(), &format!("cut{cut}.gguf"), &full[..cut]);
        assert_clean_failure(&["eval", "--model", &m, "--text", &text], &[&m]);
        assert_clean_failure(&["inspect", &m], &[&m]);
    }
}

#[test]
fn corrupt_gguf_magic_and_version() {
    let d = tempfile::tempdir().unwrap();
    let mut b = tiny_llama_gguf("llama", 0, 8 * 256 * 4);
    b[0] = b'X';
    let m = write(d.path(), "magic.gguf", &b);
    assert_clean_failure(&["inspect", &m], &[&m, "not a GGUF file"]);
    let mut b = tiny_llama_gguf("llama", 0, 8 * 256 * 4);
    b[4] = 9;
    let m = write(d.path(), "version.gguf", &b);
    assert_clean_failure(&["inspect", &m], &[&m, "version 9"]);
}

#[test]
fn unsupported_tensor_type() {
    // Q2_K (id 10): 84 bytes per 256 elements; 8×256 elements = 8 blocks.
    let d = tempfile::tempdir().unwrap();
    let m = write(d.path(), "q2k.gguf", &tiny_llama_gguf("llama", 10, 8 * 84));
    let text = write(d.path(), "t.txt", b"hello world");
    assert_clean_failure(
        &["eval", "--model", &m, "--text", &text],
        &[&m, "blk.0.ffn_up.weight", "Q2_K"],
    );
}

#[test]
fn unsupported_architecture() {
    let d = tempfile::tempdir().unwrap();
    let m = write(
        d.path(),
        "gpt2.gguf",
        &tiny_llama_gguf("gpt2", 0, 8 * 256 * 4),
    );
    assert_clean_failure(
        &["inspect", &m],
        &[&m, "'gpt2'", "llama, mistral, qwen2, gemma3"],
    );
    let text = write(d.path(), "t.txt", b"hello world");
    assert_clean_failure(&["eval", "--model", &m, "--text", &text], &[&m, "'gpt2'"]);
}

#[test]
fn gemma3_without_its_window_key_or_from_safetensors() {
    // A gemma3 GGUF must say how far its local layers see: the missing key is named.
    let d = tempfile::tempdir().unwrap();
    let m = write(
        d.path(),
        "g.gguf",
        &tiny_llama_gguf("gemma3", 0, 8 * 256 * 4),
    );
    assert_clean_failure(&["inspect", &m], &[&m, "gemma3.attention.sliding_window"]);
    // Gemma's Hugging Face names collide with LLaMA's: refused by name, not misread.
    let cfg = r#"{"model_type":"gemma3_text","vocab_size":256,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":2}"#;
    write(d.path(), "config.json", cfg.as_bytes());
    let mut st = 2u64.to_le_bytes().to_vec();
    st.extend_from_slice(b"{}");
    write(d.path(), "model.safetensors", &st);
    let dir = d.path().display().to_string();
    assert_clean_failure(&["inspect", &dir], &["gemma3_text", "GGUF files only"]);
}

#[test]
fn corrupt_safetensors_directory() {
    let d = tempfile::tempdir().unwrap();
    let cfg = r#"{"model_type":"llama","vocab_size":256,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":2}"#;
    write(d.path(), "config.json", cfg.as_bytes());
    // A header length pointing far past the end of the file.
    let st = write(
        d.path(),
        "model.safetensors",
        &[0xff, 0xff, 0, 0, 0, 0, 0, 0, b'{', b'}'],
    );
    let dir = d.path().display().to_string();
    assert_clean_failure(&["inspect", &dir], &[&st]);
    // A truncated but otherwise valid safetensors file.
    let good = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let mut b = (good.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(good);
    b.extend_from_slice(&[0u8; 8]);
    let st = write(d.path(), "model.safetensors", &b);
    assert_clean_failure(&["inspect", &dir], &[&st]);
    // Broken config.json.
    write(d.path(), "config.json", b"{not json");
    assert_clean_failure(&["inspect", &dir], &["config.json", "invalid JSON"]);
}

#[test]
fn text_shorter_than_one_window() {
    let d = tempfile::tempdir().unwrap();
    let m = write(
        d.path(),
        "m.gguf",
        &tiny_llama_gguf("llama", 0, 8 * 256 * 4),
    );
    let text = write(d.path(), "short.txt", b"just a few words");
    assert_clean_failure(
        &["eval", "--model", &m, "--text", &text, "--ctx", "64"],
        &[&text, "fewer than one window of 64"],
    );
}

#[test]
fn text_that_is_not_utf8() {
    let d = tempfile::tempdir().unwrap();
    let m = write(
        d.path(),
        "m.gguf",
        &tiny_llama_gguf("llama", 0, 8 * 256 * 4),
    );
    let text = write(d.path(), "bin.txt", &[0x66, 0x6f, 0xff, 0xfe]);
    assert_clean_failure(&["eval", "--model", &m, "--text", &text], &[&text, "UTF-8"]);
}

//! Data-free calibration (`cap_host::selfcalib`): sequences generated in one batch are
//! the sequences generated one at a time through the single-sequence decode path with
//! the same seeds (an independent path through the forward pass), the cache returns
//! exactly what was stored and refuses what does not match, and a tokenizer with
//! nothing to start from is refused with a clear error.

use std::path::PathBuf;

use cap_device::forward::{KvCache, KvDtype, Runner, Workspace};
use cap_device::sample::{Sampler, SamplerConfig};
use cap_device::tokenizer::Tokenizer;
use cap_host::import::Checkpoint;
use cap_host::selfcalib::{self, Recipe, SelfCalibError};

fn tiny(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../tests/fixtures/tiny/{name}/{name}.gguf"))
}

/// The tiny model's tokenizer (byte-level, no special tokens) with token 1 as BOS.
fn with_bos(ck: &Checkpoint) -> Tokenizer {
    let mut spec = ck.tokenizer().unwrap().spec().clone();
    spec.bos_id = Some(1);
    Tokenizer::new(spec).unwrap()
}

#[test]
fn batched_generation_equals_one_sequence_at_a_time() {
    let ck = Checkpoint::open(&tiny("llama-tied")).unwrap();
    let model = ck.load_model().unwrap();
    let tok = with_bos(&ck);
    let recipe = Recipe::new(5, 12, 3);
    let seqs = selfcalib::generate(&model, &tok, &recipe, 2, |_, _| {}).unwrap();
    assert_eq!(seqs.len(), 5);
    let start = selfcalib::start_token(&tok).unwrap();
    // The reference: each sequence alone, token by token, with the documented seeds.
    let runner = Runner::new(&model, recipe.len + 1, 1);
    let vocab = model.config.vocab_size;
    let mut ws = Workspace::new();
    let mut distinct = std::collections::BTreeSet::new();
    for (j, s) in seqs.iter().enumerate() {
        assert_eq!(s.len(), recipe.len + 1);
        assert_eq!(s[0], start);
        let mut kv = KvCache::new(&model.config, recipe.len + 1, KvDtype::F32);
        let mut want = vec![start];
        for i in 0..recipe.len {
            let logits = runner
                .next_logits(&want[i..i + 1], &mut kv, &mut ws)
                .unwrap();
            let mut sampler = Sampler::new(
                SamplerConfig {
                    temperature: recipe.temperature(i),
                    top_p: recipe.top_p,
                    seed: selfcalib::token_seed(recipe.seed, j as u64, i as u64),
                },
                vocab,
            );
            want.push(sampler.sample(logits));
        }
        assert_eq!(s, &want, "sequence {j}");
        distinct.insert(s.clone());
    }
    assert_eq!(distinct.len(), 5, "the sequences should differ");
    // Same recipe, same text; another seed, other text.
    let again = selfcalib::generate(&model, &tok, &recipe, 1, |_, _| {}).unwrap();
    assert_eq!(again, seqs);
    let other = selfcalib::generate(&model, &tok, &Recipe::new(5, 12, 4), 1, |_, _| {}).unwrap();
    assert_ne!(other, seqs);
}

#[test]
fn the_temperature_moves_linearly() {
    // The default samples the model's own distribution throughout.
    let d = Recipe::new(1, 5, 0);
    assert!((0..5).all(|i| d.temperature(i) == 1.0) && d.top_p == 1.0);
    // A schedule goes from its start to its end in equal steps.
    let r = Recipe {
        temp_start: 1.5,
        temp_end: 0.5,
        ..d
    };
    assert_eq!(r.temperature(0), 1.5);
    assert!((r.temperature(4) - 0.5).abs() < 1e-6);
    assert!((r.temperature(1) - 1.25).abs() < 1e-6);
    assert!((r.temperature(2) - 1.0).abs() < 1e-6);
}

#[test]
fn the_cache_returns_what_was_stored_and_nothing_else() {
    let ck = Checkpoint::open(&tiny("llama-tied")).unwrap();
    let model = ck.load_model().unwrap();
    let tok = with_bos(&ck);
    let dir = tempfile::tempdir().unwrap();
    let recipe = Recipe::new(3, 8, 1);
    let sha = "ab".repeat(32);
    let (first, cached) =
        selfcalib::cached_or_generate(&model, &tok, &recipe, &sha, dir.path(), 1, |_, _| {})
            .unwrap();
    assert!(!cached);
    let (second, cached) =
        selfcalib::cached_or_generate(&model, &tok, &recipe, &sha, dir.path(), 1, |_, _| {})
            .unwrap();
    assert!(cached);
    assert_eq!(first, second);
    let start = selfcalib::start_token(&tok).unwrap();
    let path = selfcalib::cache_path(dir.path(), &sha, &recipe, start);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
    // Another recipe is another file; a truncated file is not used.
    assert!(selfcalib::load(&path, &Recipe::new(3, 9, 1)).is_none());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
    assert!(selfcalib::load(&path, &recipe).is_none());
}

#[test]
fn a_tokenizer_without_a_start_token_is_refused() {
    let ck = Checkpoint::open(&tiny("llama-tied")).unwrap();
    let model = ck.load_model().unwrap();
    // The fixture's own tokenizer has neither BOS nor EOS.
    let tok = ck.tokenizer().unwrap();
    assert_eq!((tok.bos_id(), tok.eos_id()), (None, None));
    let err = selfcalib::generate(&model, &tok, &Recipe::new(2, 4, 0), 1, |_, _| {}).unwrap_err();
    assert!(matches!(err, SelfCalibError::NoStartToken), "{err}");
    assert!(err.to_string().contains("--calib"), "{err}");
    let long = Recipe::new(1, model.config.max_position, 0);
    let tok = with_bos(&ck);
    let err = selfcalib::generate(&model, &tok, &long, 1, |_, _| {}).unwrap_err();
    assert!(matches!(err, SelfCalibError::TooLong { .. }), "{err}");
}

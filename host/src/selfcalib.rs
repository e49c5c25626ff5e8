//! Data-free calibration: text the model writes itself, used when `compress` is given
//! no `--calib` file.
//!
//! Recipe (after the self-generated calibration studied for LLM quantization and
//! pruning: LLM-QAT, Liu et al. 2023; Williams et al. 2025, "Self-calibration for
//! language model quantization and pruning"): every sequence starts from the
//! tokenizer's BOS token (its EOS token when it has no BOS: GPT-style vocabularies
//! mark document boundaries with it) and is sampled token by token from the model's
//! own distribution (temperature 1, no nucleus cut), so the activations follow what
//! the model learned rather than its most likely continuations. [`Recipe`] can also
//! sample with a nucleus cut (`top_p`) at a temperature that moves linearly from
//! `temp_start` at the first token to `temp_end` at the last; on SmolLM2 at ratio 0.5
//! plain sampling beat both schedules tried (1.2 → 0.8 with top-p 0.95, and 1.5 → 0.5):
//! README, "Data-free calibration". Every sequence has its own seeded generator, so the
//! text is a function of the model and the recipe only.
//!
//! All sequences are generated together, one token of each per forward call
//! ([`Runner::next_logits_batch`]): the weights are read once per step for the whole
//! batch instead of once per token, which makes the 8k tokens of the default recipe a
//! matter of seconds to a minute on two cores rather than minutes.
//!
//! The result is cached per source model (its sha256) and recipe under
//! `~/.cache/cap/selfcalib/`, written atomically; a later `compress` with the same
//! model and recipe reads it back.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use cap_device::forward::{ForwardError, KvCache, KvDtype, Runner, Workspace};
use cap_device::model::{Linear, Model};
use cap_device::sample::{Sampler, SamplerConfig};
use cap_device::tokenizer::Tokenizer;
use sha2::{Digest, Sha256};

/// How the calibration text is generated.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Recipe {
    /// Sequences.
    pub samples: usize,
    /// Tokens per sequence (after the start token).
    pub len: usize,
    /// Seed of the sampling.
    pub seed: u64,
    /// Temperature at the first generated token.
    pub temp_start: f32,
    /// Temperature at the last generated token.
    pub temp_end: f32,
    /// Nucleus mass.
    pub top_p: f32,
}

impl Recipe {
    /// The default recipe for `samples × len` tokens: the model's own distribution
    /// (temperature 1 throughout, top-p 1).
    pub fn new(samples: usize, len: usize, seed: u64) -> Recipe {
        Recipe {
            samples,
            len,
            seed,
            temp_start: 1.0,
            temp_end: 1.0,
            top_p: 1.0,
        }
    }

    /// The temperature of generated token `i` (0-based) of `len`.
    pub fn temperature(&self, i: usize) -> f32 {
        let f = if self.len > 1 {
            i as f32 / (self.len - 1) as f32
        } else {
            0.0
        };
        self.temp_start + (self.temp_end - self.temp_start) * f
    }

    /// A stable key of the recipe and the start token, for the cache's file name.
    fn key(&self, start: u32) -> String {
        let s = format!(
            "selfcalib-v1 samples={} len={} seed={} t0={} t1={} top_p={} start={start}",
            self.samples, self.len, self.seed, self.temp_start, self.temp_end, self.top_p
        );
        crate::pack::to_hex(&Sha256::digest(s.as_bytes()))[..16].to_string()
    }
}

/// Why no calibration text could be generated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SelfCalibError {
    /// The tokenizer has neither a BOS nor an EOS token to start from.
    #[error(
        "data-free calibration needs a BOS or EOS token to start generating from, and this \
         model's tokenizer has neither; pass --calib FILE"
    )]
    NoStartToken,
    /// The tokenizer or the model has no vocabulary.
    #[error("data-free calibration: the model's vocabulary is empty; pass --calib FILE")]
    EmptyVocabulary,
    /// The recipe asks for nothing or for non-finite temperatures.
    #[error(
        "data-free calibration needs at least one sequence of at least one token and finite \
         positive temperatures"
    )]
    BadRecipe,
    /// The sequences do not fit the model's context.
    #[error("data-free calibration: {len} tokens per sequence exceed the model's context of {max}")]
    TooLong {
        /// Tokens per sequence asked for (with the start token).
        len: usize,
        /// The model's trained context.
        max: usize,
    },
    /// The forward pass refused a step.
    #[error("data-free calibration: {0}")]
    Forward(ForwardError),
    /// Reading or writing the cache failed.
    #[error("{}", path.display())]
    Io {
        /// The cache file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// The token every sequence starts from: BOS, else EOS.
pub fn start_token(tok: &Tokenizer) -> Result<u32, SelfCalibError> {
    if tok.vocab_size() == 0 {
        return Err(SelfCalibError::EmptyVocabulary);
    }
    tok.bos_id()
        .or(tok.eos_id())
        .filter(|&t| (t as usize) < tok.vocab_size())
        .ok_or(SelfCalibError::NoStartToken)
}

/// Sequences processed together: all of them, unless their KV caches would take more
/// than 1 GiB.
fn batch_size<L: Linear>(model: &Model<L>, recipe: &Recipe) -> usize {
    let per = KvCache::bytes_for(&model.config, recipe.len + 1, KvDtype::F32).max(1);
    ((1u64 << 30) / per).clamp(1, recipe.samples as u64) as usize
}

/// Generates `recipe.samples` sequences of `recipe.len + 1` tokens (the start token,
/// then `len` sampled ones) with `model`; `progress(done, total)` counts generated
/// tokens.
pub fn generate<L: Linear>(
    model: &Model<L>,
    tok: &Tokenizer,
    recipe: &Recipe,
    threads: usize,
    progress: impl Fn(usize, usize),
) -> Result<Vec<Vec<u32>>, SelfCalibError> {
    let start = start_token(tok)?;
    let positive = |x: f32| x.is_finite() && x > 0.0;
    let temps_ok = positive(recipe.temp_start) && positive(recipe.temp_end);
    if recipe.samples == 0 || recipe.len == 0 || !temps_ok || !positive(recipe.top_p) {
        return Err(SelfCalibError::BadRecipe);
    }
    let c = &model.config;
    if c.vocab_size == 0 {
        return Err(SelfCalibError::EmptyVocabulary);
    }
    let ctx = recipe.len + 1;
    if ctx > c.max_position {
        return Err(SelfCalibError::TooLong {
            len: ctx,
            max: c.max_position,
        });
    }
    let runner = Runner::new(model, ctx, threads);
    let vocab = c.vocab_size;
    let total = recipe.samples * recipe.len;
    let mut out = Vec::with_capacity(recipe.samples);
    let mut ws = Workspace::new();
    let b = batch_size(model, recipe);
    for first in (0..recipe.samples).step_by(b) {
        let n = b.min(recipe.samples - first);
        let mut kvs: Vec<KvCache> = (0..n).map(|_| KvCache::new(c, ctx, KvDtype::F32)).collect();
        let mut seqs: Vec<Vec<u32>> = (0..n)
            .map(|_| {
                let mut v = Vec::with_capacity(ctx);
                v.push(start);
                v
            })
            .collect();
        for i in 0..recipe.len {
            let last: Vec<u32> = seqs.iter().map(|s| s[s.len() - 1]).collect();
            let logits = runner
                .next_logits_batch(&last, &mut kvs, &mut ws)
                .map_err(SelfCalibError::Forward)?;
            for (j, (s, row)) in seqs.iter_mut().zip(logits.chunks_exact(vocab)).enumerate() {
                // One generator per (sequence, token): reproducible whatever the batch
                // size, with no state carried between calls.
                let mut sampler = Sampler::new(
                    SamplerConfig {
                        temperature: recipe.temperature(i),
                        top_p: recipe.top_p,
                        seed: token_seed(recipe.seed, (first + j) as u64, i as u64),
                    },
                    vocab,
                );
                s.push(sampler.sample(row));
            }
            progress(first * recipe.len + (i + 1) * n, total);
        }
        out.extend(seqs);
    }
    Ok(out)
}

/// The sampler's seed for token `i` of sequence `seq` (SplitMix64's finalizer,
/// [`cap_device::rng::mix64`], over the three numbers, so neighbouring sequences and
/// tokens get unrelated streams).
pub fn token_seed(seed: u64, seq: u64, i: u64) -> u64 {
    cap_device::rng::mix64(
        seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xC2B2_AE3D_27D4_EB4F),
    )
}

/// Magic bytes of a cache file: `CAPSCAL1`, then `samples`, `len + 1` as u32 LE, then
/// the tokens as u32 LE, sequence by sequence.
const MAGIC: &[u8; 8] = b"CAPSCAL1";

/// The cache file for a source model (`source_sha`: hex sha256) and recipe.
pub fn cache_path(dir: &Path, source_sha: &str, recipe: &Recipe, start: u32) -> PathBuf {
    let sha = &source_sha[..source_sha.len().min(16)];
    dir.join(format!("{sha}-{}.tokens", recipe.key(start)))
}

/// The cached sequences at `path`, if the file is there and well formed for `recipe`.
pub fn load(path: &Path, recipe: &Recipe) -> Option<Vec<Vec<u32>>> {
    let bytes = std::fs::read(path).ok()?;
    let ctx = recipe.len + 1;
    let (head, rest) = bytes.split_at_checked(16)?;
    let word = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    if &head[..8] != MAGIC || word(8) as usize != recipe.samples || word(12) as usize != ctx {
        return None;
    }
    if rest.len() != recipe.samples * ctx * 4 {
        return None;
    }
    let toks: Vec<u32> = rest
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Some(toks.chunks_exact(ctx).map(|s| s.to_vec()).collect())
}

/// Writes `seqs` to `path` atomically (a temporary file beside it, then a rename).
pub fn store(path: &Path, seqs: &[Vec<u32>]) -> Result<(), SelfCalibError> {
    let io = |source| SelfCalibError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let ctx = seqs.first().map_or(0, |s| s.len());
    let mut bytes = Vec::with_capacity(16 + seqs.len() * ctx * 4);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&(ctx as u32).to_le_bytes());
    for t in seqs.iter().flatten() {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _cleanup = crate::tempfiles::register(&tmp);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

/// The calibration sequences for `recipe`: from the cache when they are there, else
/// generated and cached. Returns them with whether they came from the cache.
pub fn cached_or_generate<L: Linear>(
    model: &Model<L>,
    tok: &Tokenizer,
    recipe: &Recipe,
    source_sha: &str,
    cache_dir: &Path,
    threads: usize,
    progress: impl Fn(usize, usize),
) -> Result<(Vec<Vec<u32>>, bool), SelfCalibError> {
    let start = start_token(tok)?;
    let path = cache_path(cache_dir, source_sha, recipe, start);
    if let Some(seqs) = load(&path, recipe) {
        return Ok((seqs, true));
    }
    let seqs = generate(model, tok, recipe, threads, progress)?;
    store(&path, &seqs)?;
    Ok((seqs, false))
}

/// Default cache directory: `$XDG_CACHE_HOME/cap/selfcalib` or `~/.cache/cap/selfcalib`.
pub fn default_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|b| b.join("cap").join("selfcalib"))
}

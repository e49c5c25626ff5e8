//! The committed fuzz seed corpus (`fuzz/corpus/parse/seed-*.cap`) and a
//! stand-alone mutation loop over it (the same body as the cargo-fuzz target).
mod common;

use std::path::PathBuf;

use cap_format::*;
use common::*;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse")
}

fn seed_files() -> Vec<(&'static str, Vec<u8>)> {
    let mut rng = Rng(99);
    let mut sparse = Vec::new();
    for (i, kind) in [
        Kind::BlockCsr,
        Kind::TwoFour,
        Kind::CompositeTwoFour,
        Kind::CompositeCsr,
    ]
    .into_iter()
    .enumerate()
    {
        let (d, p) = gen_tensor(&mut rng, 4, 8, kind, 0.4);
        sparse.push((format!("s{i}"), d, p));
    }
    vec![
        ("seed-small.cap", small_file(64, false)),
        ("seed-tokenizer.cap", small_file(128, true)),
        (
            "seed-sparse.cap",
            write_mem(&sparse, sample_manifest(false), 64),
        ),
        ("seed-empty.cap", write_mem(&[], sample_manifest(false), 64)),
    ]
}

/// Regenerates the committed seeds: `CAP_WRITE_SEEDS=1 cargo test -p cap-format
/// --test fuzz_seeds`.
#[test]
fn seeds_are_current_and_valid() {
    let write = std::env::var_os("CAP_WRITE_SEEDS").is_some();
    for (name, bytes) in seed_files() {
        assert_eq!(fuzzing::fuzz_one(&bytes), Ok(()), "{name}");
        let path = corpus_dir().join(name);
        if write {
            std::fs::create_dir_all(corpus_dir()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with CAP_WRITE_SEEDS=1)", path.display()));
        assert_eq!(
            on_disk, bytes,
            "{name} is stale; run with CAP_WRITE_SEEDS=1"
        );
    }
}

/// Mutates `seed`; with some probability re-seals the header and manifest CRCs so
/// mutations reach the checks behind them.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut g = seed.to_vec();
    for _ in 0..rng.range(1, 4) {
        let len = g.len().max(1) as u64;
        match rng.below(7) {
            0 => {
                let i = rng.below(len) as usize;
                if let Some(b) = g.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(len) as usize;
                if let Some(b) = g.get_mut(i) {
                    *b = [0, 0xFF, 0x7F, 0x80, 1][rng.below(5) as usize];
                }
            }
            2 => g.truncate(rng.below(len) as usize),
            3 => {
                let i = rng.below(len) as usize;
                let k = rng.range(1, 16) as usize;
                let extra = rng.bytes(k);
                g.splice(i.min(g.len())..i.min(g.len()), extra);
            }
            4 => {
                // Overwrite a header integer field with an interesting value.
                let off = [12usize, 16, 20, 24, 32, 40, 48][rng.below(7) as usize];
                let v: u64 =
                    [0, 1, 63, 64, 4096, u64::MAX, u64::MAX - 63, 1 << 32][rng.below(8) as usize];
                if g.len() >= off + 8 {
                    g[off..off + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            5 => {
                // Mutate inside the manifest specifically.
                if let Ok(h) = Header::decode(&g) {
                    let (s, e) = (h.manifest_offset as usize, g.len());
                    if s < e {
                        let i = s + rng.below((e - s) as u64) as usize;
                        g[i] = rng.next() as u8;
                    }
                }
            }
            _ => {}
        }
    }
    if rng.below(2) == 0 && g.len() >= HEADER_LEN {
        // Re-seal: manifest CRC (if the offset is sane), then the header CRC.
        let mut h_bytes = [0u8; HEADER_LEN];
        h_bytes.copy_from_slice(&g[..HEADER_LEN]);
        let mo = u64::from_le_bytes(h_bytes[40..48].try_into().unwrap());
        let ml = u64::from_le_bytes(h_bytes[48..56].try_into().unwrap());
        if let Some(m) = g.get(mo as usize..(mo.saturating_add(ml)) as usize) {
            let crc = crc32fast_hash(m);
            g[56..60].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32fast_hash(&g[..60]);
        g[60..64].copy_from_slice(&crc.to_le_bytes());
    }
    g
}

fn mutation_loop(iterations: u64, seconds: u64) -> (u64, u64) {
    let seeds: Vec<Vec<u8>> = seed_files().into_iter().map(|(_, b)| b).collect();
    let mut rng = Rng(0xF0220);
    let start = std::time::Instant::now();
    let (mut execs, mut accepted) = (0u64, 0u64);
    while execs < iterations && start.elapsed().as_secs() < seconds {
        let seed = &seeds[rng.below(seeds.len() as u64) as usize];
        let g = mutate(&mut rng, seed);
        // Any panic here fails the test with the offending seed index in the log.
        if fuzzing::fuzz_one(&g).is_ok() {
            accepted += 1;
        }
        execs += 1;
    }
    (execs, accepted)
}

#[test]
fn short_mutation_loop() {
    let (execs, _) = mutation_loop(20_000, 60);
    assert!(execs > 0);
}

/// Long run: `CAP_FUZZ_SECS=300 cargo test -p cap-format --release --test fuzz_seeds
/// -- --ignored --nocapture`.
#[test]
#[ignore]
fn long_mutation_loop() {
    let secs = std::env::var("CAP_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let (execs, accepted) = mutation_loop(u64::MAX, secs);
    println!("mutation loop: {execs} executions in {secs} s, {accepted} accepted, 0 panics");
}

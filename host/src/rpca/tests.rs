//! Unit tests of the solver: exact recovery, modes, the cache.

use super::rng::XorShift;
use super::*;

/// Relative recovery error allowed for L and S of a synthetic problem inside the
/// Candès–Li–Ma–Wright regime. IALM converges to the exact split; in `f32` each
/// iterate carries rounding of the order ε·sqrt(max(m, n))·‖W‖ (ε = 6e-8), so the
/// attainable error is about 1e-6 (measured: 1.0e-6 for L and S with the exact SVD,
/// 8e-7 with the randomized one). 1e-4 leaves a 100× margin for other CPUs' SIMD
/// paths and summation orders.
const RECOVERY_TOL: f64 = 1e-4;
/// ‖W − (L + S)‖ / ‖W‖ allowed after unscaling in activation-aware mode: the residual
/// of the scaled problem plus f32 rounding of the scale and unscale.
const UNSCALE_TOL: f64 = 1e-3;

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// W = L0 + S0 with L0 = A·Bᵀ of rank `r` (Gaussian factors) and S0 with a random
/// support of density `p` and ±`mag` values.
pub(crate) fn low_rank_plus_sparse(
    m: usize,
    n: usize,
    r: usize,
    p: f64,
    mag: f32,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut rng = XorShift::new(seed);
    let a: Vec<f64> = (0..m * r).map(|_| rng.normal()).collect();
    let b: Vec<f64> = (0..n * r).map(|_| rng.normal()).collect();
    let mut l0 = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            l0[i * n + j] = (0..r).map(|k| a[i * r + k] * b[j * r + k]).sum::<f64>() as f32;
        }
    }
    let mut s0 = vec![0.0f32; m * n];
    for x in s0.iter_mut() {
        if rng.uniform() < p {
            *x = if rng.uniform() < 0.5 { mag } else { -mag };
        }
    }
    let w = l0.iter().zip(&s0).map(|(l, s)| l + s).collect();
    (w, l0, s0)
}

fn recovery_settings(svd: SvdMethod) -> RpcaSettings {
    RpcaSettings {
        max_iters: 100,
        lambda_scale: 1.0,
        tol: DEFAULT_TOL,
        svd,
    }
}

/// Decomposes a rank-5 + 5%-sparse 200×150 matrix with `svd` and checks that L and S
/// are recovered: rank exact, relative errors below [`RECOVERY_TOL`].
fn check_exact_recovery(svd: SvdMethod, seed: u64) -> Decomposition {
    let (m, n) = (200, 150);
    let (w, l0, s0) = low_rank_plus_sparse(m, n, 5, 0.05, 10.0, seed);
    let (d, _) = decompose_matrix(
        &w,
        m,
        n,
        &recovery_settings(svd),
        None,
        Par::Seq,
        &mut |_| {},
    )
    .unwrap();
    let el = rel_err(&d.low_rank_dense(), &l0);
    let es = rel_err(&d.sparse_dense(), &s0);
    eprintln!(
        "{svd:?}: rank {} nnz {} iters {} resid {:.2e} errL {el:.2e} errS {es:.2e}",
        d.stats.rank, d.stats.nnz, d.stats.iterations, d.stats.residual
    );
    assert_eq!(d.stats.rank, 5);
    assert!(el < RECOVERY_TOL, "L error {el}");
    assert!(es < RECOVERY_TOL, "S error {es}");
    d
}

#[test]
fn exact_recovery_exact_svd() {
    let d = check_exact_recovery(SvdMethod::Exact, 1);
    assert!(d.stats.residual < DEFAULT_TOL);
}

#[test]
fn exact_recovery_randomized_svd() {
    check_exact_recovery(SvdMethod::Randomized, 2);
}

#[test]
fn wide_matrix_and_factor_shapes() {
    // n > m exercises faer's transposed path; factors must be orthonormal.
    let (m, n) = (60, 140);
    let (w, _, _) = low_rank_plus_sparse(m, n, 3, 0.05, 8.0, 3);
    let three = RpcaSettings {
        max_iters: 3,
        ..RpcaSettings::default()
    };
    let (d, _) = decompose_matrix(&w, m, n, &three, None, Par::Seq, &mut |_| {}).unwrap();
    let r = d.rank();
    assert_eq!(d.u.len(), m * r);
    assert_eq!(d.v.len(), n * r);
    for a in 0..r {
        for b in 0..r {
            let dot: f64 = (0..m)
                .map(|i| d.u[i * r + a] as f64 * d.u[i * r + b] as f64)
                .sum();
            let want = if a == b { 1.0 } else { 0.0 };
            // f32 orthonormality: a few ε·sqrt(m).
            assert!((dot - want).abs() < 1e-4, "UᵀU[{a},{b}] = {dot}");
        }
    }
    assert!(d.sigma.windows(2).all(|p| p[0] >= p[1]));
    assert_eq!(d.stats.iterations, 3);
}

#[test]
fn zero_matrix_gives_empty_split() {
    let (d, _) = decompose_matrix(
        &[0.0; 12],
        3,
        4,
        &RpcaSettings::default(),
        None,
        Par::Seq,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!((d.stats.rank, d.stats.nnz, d.stats.iterations), (0, 0, 0));
    assert_eq!(d.reconstruct(), vec![0.0; 12]);
}

#[test]
fn bad_inputs_are_errors() {
    let s = RpcaSettings::default();
    let r = |w: &[f32], m, n, s: &RpcaSettings, d: Option<&[f32]>| {
        decompose_matrix(w, m, n, s, d, Par::Seq, &mut |_| {}).is_err()
    };
    assert!(r(&[1.0; 5], 2, 3, &s, None));
    assert!(r(&[1.0, f32::NAN, 0.0, 1.0], 2, 2, &s, None));
    assert!(r(&[1.0; 4], 2, 2, &s, Some(&[1.0])));
    let zero_iters = RpcaSettings { max_iters: 0, ..s };
    assert!(r(&[1.0; 4], 2, 2, &zero_iters, None));
    let bad_lambda = RpcaSettings {
        lambda_scale: -1.0,
        ..s
    };
    assert!(r(&[1.0; 4], 2, 2, &bad_lambda, None));
}

#[test]
fn activation_aware_unscales() {
    let (m, n) = (48, 64);
    let (w, _, _) = low_rank_plus_sparse(m, n, 4, 0.05, 6.0, 4);
    let mut rng = XorShift::new(9);
    let mut d: Vec<f32> = (0..n).map(|_| (0.1 + 3.0 * rng.uniform()) as f32).collect();
    let s = RpcaSettings {
        max_iters: 30,
        ..RpcaSettings::default()
    };
    let (dec, _) = decompose_matrix(&w, m, n, &s, Some(&d), Par::Seq, &mut |_| {}).unwrap();
    assert!(matches!(dec.mode, Mode::ActivationAware { .. }));
    let e = rel_err(&dec.reconstruct(), &w);
    assert!(e < UNSCALE_TOL, "reconstruction error {e}");
    let (plain, _) = decompose_matrix(&w, m, n, &s, None, Par::Seq, &mut |_| {}).unwrap();
    assert_eq!(plain.mode, Mode::Plain);
    assert_ne!(plain.s, dec.s, "the scale must change the split");
    // An input channel calibration never touched (d = 0) is floored, not divided by.
    d[5] = 0.0;
    let (dz, _) = decompose_matrix(&w, m, n, &s, Some(&d), Par::Seq, &mut |_| {}).unwrap();
    assert!(dz.reconstruct().iter().all(|x| x.is_finite()));
}

#[test]
fn cache_round_trip_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (m, n) = (30, 20);
    let (w, _, _) = low_rank_plus_sparse(m, n, 2, 0.05, 5.0, 5);
    let s = RpcaSettings::default();
    let (d, _) = decompose_matrix(&w, m, n, &s, None, Par::Seq, &mut |_| {}).unwrap();
    let key = cache::CacheKey::new(&w, m, n, &s, None);
    let path = cache::cache_path(dir.path(), "blk.0.attn_q.weight").unwrap();
    cache::write(&path, &key, &d).unwrap();
    assert_eq!(
        load_cached(dir.path(), "blk.0.attn_q.weight", &w, m, n, &s, None),
        Some(d.clone())
    );
    // Other settings, another weight, another mode: not cached.
    let s2 = RpcaSettings {
        lambda_scale: 2.0,
        ..s
    };
    assert!(load_cached(dir.path(), "blk.0.attn_q.weight", &w, m, n, &s2, None).is_none());
    let mut w2 = w.clone();
    w2[7] += 1e-3;
    assert!(load_cached(dir.path(), "blk.0.attn_q.weight", &w2, m, n, &s, None).is_none());
    assert!(
        load_cached(
            dir.path(),
            "blk.0.attn_q.weight",
            &w,
            m,
            n,
            &s,
            Some(&[1.0; 20])
        )
        .is_none()
    );
    // A flipped payload byte or a truncation: not cached.
    let bytes = std::fs::read(&path).unwrap();
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    assert!(!cache::is_cached(&path, &key));
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    assert!(!cache::is_cached(&path, &key));
    // Hostile names are refused.
    assert!(cache::cache_path(dir.path(), "../x").is_err());
    assert!(cache::cache_path(dir.path(), "a/b").is_err());
}

#[test]
fn shard_parsing() {
    use std::str::FromStr;
    let s = model::Shard::from_str("2/4").unwrap();
    assert_eq!((s.index, s.count), (2, 4));
    for bad in ["3/2", "0/2", "1/0", "x/2", "12", "1/2/3"] {
        assert!(model::Shard::from_str(bad).is_err(), "{bad}");
    }
}

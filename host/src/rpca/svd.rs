//! The SVDs IALM needs, on faer: the exact thin SVD (the default), a randomized
//! truncated SVD for iterations whose surviving rank is predicted to be small, and the
//! spectral norm.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::matmul::matmul;
use faer::linalg::svd::{ComputeSvdVectors, svd, svd_scratch};
use faer::{Accum, Mat, MatRef, Par};

use super::rng::XorShift;

/// A thin (or truncated) SVD `A ≈ U·diag(s)·Vᵀ`, singular values non-increasing.
pub struct ThinSvd {
    /// Left singular vectors, `m × k`.
    pub u: Mat<f32>,
    /// Singular values, `k`.
    pub s: Vec<f32>,
    /// Right singular vectors, `n × k`.
    pub v: Mat<f32>,
}

/// Exact thin SVD of `a` (`k = min(m, n)`), `None` if faer's iteration did not converge.
pub fn thin_svd(a: MatRef<'_, f32>, par: Par) -> Option<ThinSvd> {
    let (m, n) = a.shape();
    let k = m.min(n);
    let mut u = Mat::<f32>::zeros(m, k);
    let mut v = Mat::<f32>::zeros(n, k);
    let mut s = faer::diag::Diag::<f32>::zeros(k);
    let params = Default::default();
    let mut buf = MemBuffer::new(svd_scratch::<f32>(
        m,
        n,
        ComputeSvdVectors::Thin,
        ComputeSvdVectors::Thin,
        par,
        params,
    ));
    svd(
        a,
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        par,
        MemStack::new(&mut buf),
        params,
    )
    .ok()?;
    let s = (0..k).map(|i| s[i]).collect();
    Some(ThinSvd { u, s, v })
}

/// The singular values of `a` only (no vectors: about a third of a thin SVD's cost).
pub fn singular_values(a: MatRef<'_, f32>, par: Par) -> Option<Vec<f32>> {
    let (m, n) = a.shape();
    let k = m.min(n);
    let mut s = faer::diag::Diag::<f32>::zeros(k);
    let params = Default::default();
    let mut buf = MemBuffer::new(svd_scratch::<f32>(
        m,
        n,
        ComputeSvdVectors::No,
        ComputeSvdVectors::No,
        par,
        params,
    ));
    svd(
        a,
        s.as_mut(),
        None,
        None,
        par,
        MemStack::new(&mut buf),
        params,
    )
    .ok()?;
    Some((0..k).map(|i| s[i]).collect())
}

/// Spectral norm ‖A‖₂ = σ₁, exact (from the singular values). Power iteration would be
/// cheaper, but on the clustered spectra of random-like weight matrices it converges
/// slowly and its error moves μ₀ and with it every threshold of the solve.
pub fn spectral_norm(a: MatRef<'_, f32>, par: Par) -> Option<f32> {
    singular_values(a, par).map(|s| s.first().copied().unwrap_or(0.0))
}

/// Columns of oversampling beyond the requested rank in [`randomized_svd`] (Halko,
/// Martinsson & Tropp 2011 recommend 5–10; 10 also matches R's `rsvd`).
pub const RSVD_OVERSAMPLE: usize = 10;
/// Power (subspace) iterations in [`randomized_svd`]: 2 is `rsvd`'s default and makes
/// the leading singular values accurate to f32 level on slowly decaying spectra.
pub const RSVD_POWER_ITERS: usize = 2;

/// Orthonormal basis of the columns of `y` (via its thin SVD's `U`, which is as stable
/// as a QR and needs no second faer API).
fn orthonormalize(y: MatRef<'_, f32>, par: Par) -> Option<Mat<f32>> {
    thin_svd(y, par).map(|t| t.u)
}

/// Randomized truncated SVD of rank `k` (Halko, Martinsson & Tropp 2011, algorithm 4.4
/// with re-orthonormalized power iterations). Returns `k` triplets (fewer if
/// `k + oversampling` reaches `min(m, n)`, where the exact SVD is used instead).
/// Deterministic: the Gaussian test matrix comes from `seed`.
pub fn randomized_svd(a: MatRef<'_, f32>, k: usize, seed: u64, par: Par) -> Option<ThinSvd> {
    let (m, n) = a.shape();
    let l = k + RSVD_OVERSAMPLE;
    if l >= m.min(n) {
        return thin_svd(a, par);
    }
    let mut rng = XorShift::new(seed);
    let omega = Mat::<f32>::from_fn(n, l, |_, _| rng.normal() as f32);
    let mut y = Mat::<f32>::zeros(m, l);
    matmul(y.as_mut(), Accum::Replace, a, omega.as_ref(), 1.0, par);
    let mut q = orthonormalize(y.as_ref(), par)?;
    let mut z = Mat::<f32>::zeros(n, l);
    for _ in 0..RSVD_POWER_ITERS {
        matmul(
            z.as_mut(),
            Accum::Replace,
            a.transpose(),
            q.as_ref(),
            1.0,
            par,
        );
        let qz = orthonormalize(z.as_ref(), par)?;
        matmul(y.as_mut(), Accum::Replace, a, qz.as_ref(), 1.0, par);
        q = orthonormalize(y.as_ref(), par)?;
    }
    // B = Qᵀ A (l × n); its SVD gives A ≈ (Q U_B) Σ V_Bᵀ.
    let mut b = Mat::<f32>::zeros(l, n);
    matmul(b.as_mut(), Accum::Replace, q.transpose(), a, 1.0, par);
    let t = thin_svd(b.as_ref(), par)?;
    let kk = k.min(t.s.len());
    let mut u = Mat::<f32>::zeros(m, kk);
    matmul(
        u.as_mut(),
        Accum::Replace,
        q.as_ref(),
        t.u.as_ref().get(.., ..kk),
        1.0,
        par,
    );
    Some(ThinSvd {
        u,
        s: t.s[..kk].to_vec(),
        v: t.v.as_ref().get(.., ..kk).to_owned(),
    })
}

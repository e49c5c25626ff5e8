//! What a compressed model may cost, and what each choice costs.
//!
//! Two accountings: true bytes (the default: exactly what cap-format writes, in the
//! cheapest encoding it has for each layer) and the paper's parameter count (a kept
//! singular value costs `m + n`, a kept sparse entry 1; for comparisons with papers).
//! A budget is a limit on the compressed linears, derived from a device profile, a
//! file size or a ratio.

use super::error::{CompressError, Result};
use cap_device::config::Config;
use cap_device::forward::{KvCache, KvDtype, scratch_bytes};
use cap_format::{DType, Encoding, Sparse, TensorDesc, encoded_bytes, row_groups};
use serde::Serialize;

use super::speed::{DECODE_BANDWIDTH_EFFICIENCY, DecodeCost};
use crate::targets::Profile;

/// Memory a running `cap-device` needs besides the model file, the KV cache and the
/// forward pass's scratch: the executable, the tokenizer's tables, thread stacks and
/// allocator slack. A planning figure (the `cap-device` binary is a few MiB; SmolLM2's
/// tokenizer tables take about 10 MiB), not a measurement.
pub const RUNTIME_OVERHEAD_BYTES: u64 = 32 << 20;

/// What a budget counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Accounting {
    /// Bytes of the tensor sections as written (factor and value dtype `dtype`).
    Bytes,
    /// The paper's parameters: `m + n` per singular value, 1 per sparse entry.
    Params,
}

/// Exact costs of keeping `rank` singular directions and `nnz` sparse entries of one
/// `rows × cols` linear.
#[derive(Clone, Copy, Debug)]
pub struct CostModel {
    /// What is counted.
    pub accounting: Accounting,
    /// Value type of the compressed linears: factors, sparse values, dense values.
    pub dtype: DType,
}

impl CostModel {
    /// The most quantization groups `nnz` kept values of a `rows × cols` sparse part can
    /// fill (0 for a float `dtype`): each row's kept values are cut into groups of `G`,
    /// the last one partial, so `Σ_r ⌈k_r/G⌉ ≤ Σ_r (k_r + G − 1)/G`, and never more
    /// than one group per value or `⌈cols/G⌉` per row. Selection prices quantized
    /// sparse parts with this bound (the row split is not known yet), so the exact bytes
    /// written ([`CostModel::encoding_exact`]) never exceed what was priced.
    pub fn group_bound(&self, rows: usize, cols: usize, nnz: u64) -> u64 {
        if !self.dtype.is_quantized() {
            return 0;
        }
        let g = self.dtype.group() as u64;
        let (rows, cols) = (rows as u64, cols as u64);
        let padded = nnz.saturating_add(rows.saturating_mul(g - 1)) / g;
        nnz.min(rows.saturating_mul(cols.div_ceil(g))).min(padded)
    }

    /// The encoding the writer uses for such a layer and its bytes: the cheapest of
    /// the factored encodings (low-rank, sparse or both) and a dense matrix holding the
    /// same product. Exact for float values; for quantized values a sparse part is
    /// priced at [`CostModel::group_bound`] groups, an upper bound of the exact bytes.
    pub fn encoding(&self, rows: usize, cols: usize, rank: usize, nnz: u64) -> (Encoding, u64) {
        let groups = self.group_bound(rows, cols, nnz);
        self.encoding_with_groups(rows, cols, rank, nnz, groups)
    }

    /// [`CostModel::encoding`] once the kept sparse entries per row are known
    /// (`row_counts[r]` in row `r`): the exact encoding and bytes the writer produces,
    /// never more than [`CostModel::encoding`] of the same totals.
    pub fn encoding_exact(
        &self,
        rows: usize,
        cols: usize,
        rank: usize,
        row_counts: &[u32],
    ) -> (Encoding, u64) {
        let nnz = row_counts.iter().map(|&k| u64::from(k)).sum();
        let groups = row_groups(row_counts, self.dtype);
        self.encoding_with_groups(rows, cols, rank, nnz, groups)
    }

    /// The cheapest encoding with `groups` quantization groups in the sparse part.
    fn encoding_with_groups(
        &self,
        rows: usize,
        cols: usize,
        rank: usize,
        nnz: u64,
        groups: u64,
    ) -> (Encoding, u64) {
        let (r32, c32) = (rows as u32, cols as u32);
        let bytes = |encoding| {
            encoded_bytes(&TensorDesc {
                rows: r32,
                cols: c32,
                encoding,
            })
            .unwrap_or(u64::MAX)
        };
        let dtype = self.dtype;
        let sparse = [
            Sparse::with_values(true, nnz, groups, dtype),
            Sparse::with_values(false, nnz, groups, dtype),
        ]
        .into_iter()
        .map(|s| (s, bytes(Encoding::Sparse(s))))
        .min_by_key(|&(_, b)| b)
        .map(|(s, _)| s)
        .unwrap_or(Sparse::with_values(true, nnz, groups, dtype));
        let factored = match (rank, nnz) {
            (0, _) => Encoding::Sparse(sparse),
            (r, 0) => Encoding::LowRank {
                rank: r as u32,
                dtype,
            },
            (r, _) => Encoding::Composite {
                rank: r as u32,
                factor_dtype: dtype,
                sparse,
            },
        };
        let dense = Encoding::Dense { dtype };
        let (f, d) = (bytes(factored), bytes(dense));
        if f <= d { (factored, f) } else { (dense, d) }
    }

    /// The exact cost of a layer whose kept sparse entries per row are `row_counts`
    /// (what [`CostModel::cost`] bounds for quantized values).
    pub fn cost_exact(&self, rows: usize, cols: usize, rank: usize, row_counts: &[u32]) -> u64 {
        match self.accounting {
            Accounting::Bytes => self.encoding_exact(rows, cols, rank, row_counts).1,
            Accounting::Params => {
                rank as u64 * (rows + cols) as u64
                    + row_counts.iter().map(|&k| u64::from(k)).sum::<u64>()
            }
        }
    }

    /// The cost of the layer in this accounting (for quantized values in bytes, the
    /// bound of [`CostModel::encoding`]).
    pub fn cost(&self, rows: usize, cols: usize, rank: usize, nnz: u64) -> u64 {
        match self.accounting {
            Accounting::Bytes => self.encoding(rows, cols, rank, nnz).1,
            Accounting::Params => rank as u64 * (rows + cols) as u64 + nnz,
        }
    }

    /// Linear approximation of [`CostModel::cost`] for the relaxed problem of the
    /// search: `(per singular value, per sparse entry, fixed)`. Exact for parameters;
    /// for bytes it leaves out padding and the choice of encoding, which the final
    /// exact selection accounts for.
    pub fn marginal(&self, rows: usize, cols: usize) -> (f64, f64, u64) {
        match self.accounting {
            Accounting::Params => ((rows + cols) as f64, 1.0, 0),
            Accounting::Bytes => {
                // Bytes per stored value (a quantized block's bytes over its values).
                let ds = self.dtype.size() as f64 / self.dtype.group() as f64;
                ((rows + cols) as f64 * ds, ds, self.cost(rows, cols, 0, 0))
            }
        }
    }
}

/// Where a budget comes from.
#[derive(Clone, Debug)]
pub enum BudgetSpec {
    /// A device profile: the model file, the KV cache for `ctx × batch` tokens, the
    /// forward pass's scratch and the runtime must fit its usable memory.
    Target {
        /// The profile.
        profile: Box<Profile>,
        /// Context length the board must serve.
        ctx: usize,
        /// Sequences served at once.
        batch: usize,
        /// Decode steps per second the board must reach ([`super::speed`]).
        min_tokens_per_s: Option<f64>,
    },
    /// The written file must be at most this many bytes.
    FileBytes(u64),
    /// The paper's ratio: kept parameters ≤ ratio × the dense linears' parameters.
    Ratio(f64),
}

/// What the model costs besides the compressed linears.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct FixedCosts {
    /// Bytes of the tensors kept dense (embedding, norms, biases, an untied head).
    pub dense_tensor_bytes: u64,
    /// Upper bound of the header, padding and manifest bytes.
    pub file_overhead_bytes: u64,
    /// Parameters of the compressed linears when dense.
    pub linear_params: u64,
    /// Bytes of the compressed linears stored dense.
    pub linear_dense_bytes: u64,
    /// Cost of the linears when nothing is kept (the smallest they can be).
    pub linear_min_bytes: u64,
    /// Bytes of the dense tensors one decoded token reads: all of them, less the
    /// embedding but one row when the output head is a separate tensor.
    pub dense_read_bytes: u64,
}

/// A resolved budget.
#[derive(Clone, Debug, Serialize)]
pub struct Budget {
    /// What `limit` counts.
    pub accounting: Accounting,
    /// The most the compressed linears may cost.
    pub limit: u64,
    /// Human-readable source (`target jetson-orin-nano-8gb, ctx 2048, batch 1`, ...).
    pub source: String,
    /// For a target: the terms subtracted from usable memory, in order.
    pub breakdown: Vec<(String, u64)>,
    /// For a target with a decode-speed requirement: the bound it sets.
    pub speed: Option<SpeedBound>,
}

/// The bound a decode-speed requirement puts on the compressed linears.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SpeedBound {
    /// Decode steps per second required.
    pub tokens_per_s: f64,
    /// The most bytes the linears may take for it.
    pub linear_limit: u64,
    /// The most bytes memory alone allows them.
    pub memory_limit: u64,
    /// What a decoded token reads besides the linears, and at what rate.
    pub cost: DecodeCost,
}

/// Bytes of the f32 KV cache a board must hold to serve `batch` sequences of `ctx`
/// tokens of a model with `config` (checked arithmetic); an error in one line when
/// the KV cache alone is more than `profile`'s usable memory, before anything else is
/// counted (`compress` checks this before loading the weights).
pub fn target_kv_bytes(
    profile: &Profile,
    config: &Config,
    ctx: usize,
    batch: usize,
) -> Result<u64> {
    if ctx == 0 || batch == 0 {
        return Err(CompressError::Invalid(
            "--ctx and --batch must be at least 1".into(),
        ));
    }
    let usable = profile.usable_bytes();
    // `bytes_for` saturates at u64::MAX, which no profile's memory reaches.
    let kv = ctx.checked_mul(batch).map_or(u64::MAX, |tokens| {
        KvCache::bytes_for(config, tokens, KvDtype::F32)
    });
    if kv > usable {
        let kv = if kv == u64::MAX {
            "more than 2^64".to_string()
        } else {
            kv.to_string()
        };
        return Err(CompressError::Invalid(format!(
            "target {}: the KV cache for --ctx {ctx} × --batch {batch} (f32, {} layers × {} KV dims) takes {kv} bytes, \
             more than the {usable} usable bytes ({} total − {} reserved); lower --ctx or --batch",
            profile.name,
            config.n_layers,
            config.kv_dim(),
            profile.total_memory_bytes,
            profile.reserved_bytes,
        )));
    }
    Ok(kv)
}

/// Turns `spec` into a limit for the compressed linears of a model with `config` and
/// fixed costs `fixed`; an infeasible budget is an error that says what is missing.
pub fn resolve(spec: &BudgetSpec, config: &Config, fixed: &FixedCosts) -> Result<Budget> {
    let file_fixed = fixed.dense_tensor_bytes + fixed.file_overhead_bytes;
    let need_min = file_fixed + fixed.linear_min_bytes;
    match spec {
        BudgetSpec::Ratio(r) => {
            if !(*r > 0.0 && *r <= 1.0) {
                return Err(CompressError::Invalid(format!(
                    "--ratio must be in (0, 1], got {r}"
                )));
            }
            let limit = (r * fixed.linear_params as f64).floor() as u64;
            Ok(Budget {
                accounting: Accounting::Params,
                limit,
                source: format!("ratio {r} of {} linear parameters", fixed.linear_params),
                breakdown: vec![],
                speed: None,
            })
        }
        BudgetSpec::FileBytes(b) => {
            if *b < need_min {
                return Err(CompressError::Invalid(format!(
                    "a budget of {b} bytes is below what the model needs with every compressed layer empty: \
                     {file_fixed} bytes for the dense tensors (embedding, norms) and the file's header and manifest \
                     plus {} bytes for the emptiest linears; {} bytes are missing (the smallest feasible --budget is {need_min}; \
                     the uncompressed file is about {} bytes)",
                    fixed.linear_min_bytes,
                    need_min - b,
                    file_fixed + fixed.linear_dense_bytes
                )));
            }
            Ok(Budget {
                accounting: Accounting::Bytes,
                limit: b - file_fixed,
                source: format!("file of at most {b} bytes"),
                breakdown: vec![
                    ("dense tensors".into(), fixed.dense_tensor_bytes),
                    (
                        "header and manifest (bound)".into(),
                        fixed.file_overhead_bytes,
                    ),
                ],
                speed: None,
            })
        }
        BudgetSpec::Target {
            profile,
            ctx,
            batch,
            min_tokens_per_s,
        } => {
            let usable = profile.usable_bytes();
            // Refused here when the KV cache alone does not fit, so `ctx × batch` is
            // bounded by the usable bytes for the terms below.
            let kv = target_kv_bytes(profile, config, *ctx, *batch)?;
            let scratch = scratch_bytes(
                config,
                ctx * batch,
                *ctx,
                KvDtype::F32,
                cap_device::caplinear::scratch_bound(config),
            );
            let breakdown = vec![
                (format!("KV cache (f32, ctx {ctx} × batch {batch})"), kv),
                ("activations and scratch".into(), scratch),
                ("runtime".into(), RUNTIME_OVERHEAD_BYTES),
                ("dense tensors".into(), fixed.dense_tensor_bytes),
                (
                    "header and manifest (bound)".into(),
                    fixed.file_overhead_bytes,
                ),
            ];
            // Saturating: a sum past u64 is "more than any board has", refused below.
            let taken = breakdown
                .iter()
                .fold(0u64, |t, (_, b)| t.saturating_add(*b));
            let need = taken.saturating_add(fixed.linear_min_bytes);
            if usable < need {
                let parts: Vec<String> =
                    breakdown.iter().map(|(n, b)| format!("{n} {b}")).collect();
                return Err(CompressError::Invalid(format!(
                    "target {}: {usable} usable bytes ({} total − {} reserved) cannot hold the model even with every \
                     compressed layer empty: {} plus {} bytes for the emptiest linears; {} bytes are missing \
                     (a smaller --ctx or --batch frees KV cache and scratch)",
                    profile.name,
                    profile.total_memory_bytes,
                    profile.reserved_bytes,
                    parts.join(", "),
                    fixed.linear_min_bytes,
                    need - usable
                )));
            }
            let memory_limit = usable - taken;
            let mut source = format!("target {}, ctx {ctx}, batch {batch}", profile.name);
            let Some(tps) = *min_tokens_per_s else {
                return Ok(Budget {
                    accounting: Accounting::Bytes,
                    limit: memory_limit,
                    source,
                    breakdown,
                    speed: None,
                });
            };
            if !(tps.is_finite() && tps > 0.0) {
                return Err(CompressError::Invalid(format!(
                    "--min-tokens-per-s must be a positive number, got {tps}"
                )));
            }
            let speed = DecodeCost::new(profile, config, *ctx, *batch, fixed.dense_read_bytes);
            let fastest = speed.tokens_per_s(fixed.linear_min_bytes);
            let speed_limit = speed
                .linear_limit(tps)
                .filter(|&l| l >= fixed.linear_min_bytes)
                .ok_or_else(|| {
                    CompressError::Invalid(format!(
                        "target {}: {tps} tokens/s is out of reach: with every compressed layer empty a decoded \
                         token still reads {} bytes ({} of dense tensors, {} of KV cache at half of ctx {ctx}, {} of \
                         empty linears), which {:.1} GB/s usable ({} GB/s × {DECODE_BANDWIDTH_EFFICIENCY}) streams \
                         {fastest:.1} times a second",
                        profile.name,
                        speed.bytes_per_token(fixed.linear_min_bytes),
                        speed.dense_read_bytes,
                        speed.kv_read_bytes,
                        fixed.linear_min_bytes,
                        speed.bandwidth_bytes_per_s / 1e9,
                        profile.memory_bandwidth_gbps,
                    ))
                })?;
            source.push_str(&format!(", at least {tps} tokens/s"));
            Ok(Budget {
                accounting: Accounting::Bytes,
                limit: memory_limit.min(speed_limit),
                source,
                breakdown,
                speed: Some(SpeedBound {
                    tokens_per_s: tps,
                    linear_limit: speed_limit,
                    memory_limit,
                    cost: speed,
                }),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_choice_is_the_cheapest_exact_one() {
        let c = CostModel {
            accounting: Accounting::Bytes,
            dtype: DType::F16,
        };
        // Nothing kept: the empty block-CSR (row pointers only) beats an empty bitmask.
        let (e, b) = c.encoding(576, 1536, 0, 0);
        assert!(
            matches!(e, Encoding::Sparse(Sparse::BlockCsr { nnz: 0, .. })),
            "{e:?}"
        );
        assert_eq!(b, c.cost(576, 1536, 0, 0));
        // 90% dense: a bitmask (1/8 + 0.9·2 bytes per entry) still beats dense f16.
        let (e, _) = c.encoding(576, 1536, 0, 576 * 1536 * 9 / 10);
        assert!(
            matches!(e, Encoding::Sparse(Sparse::Bitmask { .. })),
            "{e:?}"
        );
        // 95% dense: 1/8 + 1.9 > 2 bytes per entry → dense.
        let (e, b) = c.encoding(576, 1536, 0, 576 * 1536 * 95 / 100);
        assert_eq!(e, Encoding::Dense { dtype: DType::F16 });
        assert_eq!(b, 576 * 1536 * 2);
        // Full rank plus anything costs more than dense.
        assert_eq!(
            c.encoding(576, 576, 576, 10).0,
            Encoding::Dense { dtype: DType::F16 }
        );
        // Low rank alone: two factors, each part padded to 64 bytes.
        let (e, b) = c.encoding(576, 1536, 10, 0);
        assert!(matches!(e, Encoding::LowRank { rank: 10, .. }));
        assert_eq!(b, (10 * 1536 * 2 + 576 * 10 * 2u64).div_ceil(64) * 64);
        let p = CostModel {
            accounting: Accounting::Params,
            dtype: DType::F16,
        };
        assert_eq!(p.cost(576, 1536, 10, 7), 10 * (576 + 1536) + 7);
    }

    /// Quantized values: selection's price (the group bound) is never below the exact
    /// bytes of a split of the kept entries over the rows, which are the bytes the
    /// layout gives; float values price exactly.
    #[test]
    fn quantized_prices_bound_the_exact_bytes() {
        use cap_device::rng::XorShift64Star;
        let mut rng = XorShift64Star::new(3);
        for dtype in [DType::Q8 { group: 64 }, DType::Q4 { group: 16 }, DType::F16] {
            let c = CostModel {
                accounting: Accounting::Bytes,
                dtype,
            };
            for (rows, cols) in [(7, 100), (64, 48), (192, 576)] {
                for density in [0.0, 0.02, 0.3, 0.5, 0.9, 1.0] {
                    let counts: Vec<u32> = (0..rows)
                        .map(|_| {
                            let k = (density * cols as f64 * 2.0 * rng.uniform()) as u32;
                            k.min(cols as u32)
                        })
                        .collect();
                    let nnz: u64 = counts.iter().map(|&k| u64::from(k)).sum();
                    for rank in [0, 3] {
                        let (e, exact) = c.encoding_exact(rows, cols, rank, &counts);
                        let bound = c.cost(rows, cols, rank, nnz);
                        assert!(
                            exact <= bound,
                            "{dtype} {rows}x{cols} {nnz}: {exact} > {bound}"
                        );
                        assert_eq!(exact, c.cost_exact(rows, cols, rank, &counts));
                        let written = encoded_bytes(&TensorDesc {
                            rows: rows as u32,
                            cols: cols as u32,
                            encoding: e,
                        })
                        .unwrap();
                        assert_eq!(written, exact);
                        if !dtype.is_quantized() {
                            assert_eq!(exact, bound);
                        }
                    }
                }
            }
        }
    }
}

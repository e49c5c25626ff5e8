//! Stage "budget": the costs besides the compressed linears, and the limit on them.

use cap_device::model::{DenseLinear, Model};
use cap_format::MIN_ALIGNMENT;
use cap_format::manifest::Manifest;

use super::budget::{Accounting, Budget, BudgetSpec, CostModel, FixedCosts, resolve};
use super::error::{Result, step_error};
use super::tensors::{dense_read_bytes, dense_tensor_bytes, manifest_bound};
use cap_device::tensors::file_tensor_names;

/// The resolved budget and how choices are costed against it.
pub struct Planned {
    /// The cost of a linear's kept items, in the budget's accounting.
    pub cost: CostModel,
    /// The costs besides the compressed linears.
    pub fixed: FixedCosts,
    /// The limit on the compressed linears.
    pub budget: Budget,
}

/// Resolves the budget for compressing `linears` of `model` (values in `values`, the
/// tensors kept dense in `dtype`), with `manifest` (as far as it is known before the
/// budget) bounding the file's overhead.
pub fn plan(
    spec: &BudgetSpec,
    dtype: cap_format::DType,
    values: cap_format::DType,
    model: &Model<DenseLinear>,
    linears: &[(String, &DenseLinear)],
    manifest: &Manifest,
) -> Result<Planned> {
    let cost = CostModel {
        accounting: match spec {
            BudgetSpec::Ratio(_) => Accounting::Params,
            _ => Accounting::Bytes,
        },
        dtype: values,
    };
    let bytes_model = CostModel {
        accounting: Accounting::Bytes,
        dtype: values,
    };
    let linear_names: Vec<String> = linears.iter().map(|(n, _)| n.clone()).collect();
    let shapes = || linears.iter().map(|(_, l)| (l.out_features, l.in_features));
    let fixed = FixedCosts {
        dense_tensor_bytes: dense_tensor_bytes(model, dtype)?,
        file_overhead_bytes: u64::from(MIN_ALIGNMENT)
            + manifest_bound(
                manifest,
                &file_tensor_names(&model.config),
                &linear_names,
                values,
            )?,
        linear_params: shapes().map(|(m, n)| (m * n) as u64).sum(),
        linear_dense_bytes: shapes()
            .map(|(m, n)| bytes_model.cost(m, n, 0, (m * n) as u64))
            .sum(),
        linear_min_bytes: shapes().map(|(m, n)| bytes_model.cost(m, n, 0, 0)).sum(),
        dense_read_bytes: dense_read_bytes(model, dtype)?,
    };
    let budget = resolve(spec, &model.config, &fixed).map_err(step_error)?;
    Ok(Planned {
        cost,
        fixed,
        budget,
    })
}

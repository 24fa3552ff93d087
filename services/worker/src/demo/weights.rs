//! Deterministic random weights for the demo model. Building a module over [`RandomWeights`] records every tensor
//! the module asks for, filled from a generator seeded by the tensor's name, so the same code always writes the
//! same model and the written key set is exactly what the strict loader will ask for.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{ModelError, Result};
use crate::pipeline::noise::Gaussian;

/// Records the tensors a module asks for, created on first request.
#[derive(Clone, Default)]
pub struct RandomWeights {
    seed: u64,
    tensors: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

impl RandomWeights {
    /// A new, empty recorder; `seed` makes a different but equally deterministic model.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            tensors: Arc::default(),
        }
    }

    /// A var builder that creates tensors on demand (f32, CPU).
    pub fn var_builder(&self) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(self.clone());
        VarBuilder::from_backend(backend, DType::F32, Device::Cpu)
    }

    /// Writes what was recorded to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self
            .tensors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| save_err(path, e))?;
        }
        candle_core::safetensors::save(&map, path).map_err(|e| save_err(path, e))
    }

    /// Number of tensors recorded.
    pub fn len(&self) -> usize {
        self.tensors.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn make(&self, name: &str, shape: &Shape) -> candle_core::Result<Tensor> {
        let mut rng = Gaussian::new(self.seed ^ fnv1a(name));
        let dims = shape.dims();
        let n = shape.elem_count();
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let data: Vec<f32> = if dims.len() >= 2 {
            // Matrices and kernels: variance-preserving normal over the fan-in.
            let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
            rng.sample(n, 0.0, (1.0 / fan_in as f64).sqrt())
        } else if leaf == "weight" {
            // 1-D weights are norm scales.
            rng.sample(n, 1.0, 0.05)
        } else {
            rng.sample(n, 0.0, 0.02)
        };
        Tensor::from_vec(data, shape.clone(), &Device::Cpu)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut map = self.tensors.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(t) = map.get(name) {
            if t.shape() != &s {
                candle_core::bail!("demo weight `{name}` requested as {s:?} and as {:?}", t.shape());
            }
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = self.make(name, &s)?;
        map.insert(name.to_owned(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("demo weight `{name}` requested without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn save_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Load {
        path: path.to_owned(),
        message: format!("cannot write: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_values_and_shapes_checked() {
        let a = RandomWeights::new(7);
        let b = RandomWeights::new(7);
        let ta = a.var_builder().get((4, 3), "x.weight").expect("a");
        let tb = b.var_builder().get((4, 3), "x.weight").expect("b");
        let diff = (ta - tb).expect("sub").abs().expect("abs").sum_all().expect("sum");
        assert_eq!(diff.to_scalar::<f32>().expect("scalar"), 0.0);
        assert!(a.var_builder().get((3, 4), "x.weight").is_err());
        let norm = a.var_builder().get(4, "n.weight").expect("norm");
        let mean = norm.mean_all().expect("mean").to_scalar::<f32>().expect("scalar");
        assert!((mean - 1.0).abs() < 0.2, "{mean}");
    }
}

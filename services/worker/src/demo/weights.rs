//! Deterministic random weights for generated models (the demo model and the full-size random checkpoint).
//! Building a module over [`RandomWeights`] records the name and shape of every tensor the module asks for (the
//! module gets zero-stride placeholders, so recording a multi-gigabyte model allocates almost nothing); the values
//! are drawn when the file is written, one tensor at a time, from a generator seeded by the tensor's name. The same
//! code therefore always writes the same model, and the written key set is exactly what the strict loader reads.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::safetensors_out::{write_safetensors, write_sharded, Sharding};
use crate::error::Result;
use crate::pipeline::noise::Gaussian;

/// Records the tensors a module asks for (name → shape); values are drawn when written.
#[derive(Clone, Default)]
pub struct RandomWeights {
    seed: u64,
    shapes: Arc<Mutex<BTreeMap<String, Vec<usize>>>>,
}

impl RandomWeights {
    /// A new, empty recorder; `seed` makes a different but equally deterministic model.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            shapes: Arc::default(),
        }
    }

    /// A var builder that records what it is asked for (f32, CPU placeholders).
    pub fn var_builder(&self) -> VarBuilder<'static> {
        let backend: Box<dyn SimpleBackend> = Box::new(self.clone());
        VarBuilder::from_backend(backend, DType::F32, Device::Cpu)
    }

    /// The recorded tensors, sorted by name.
    pub fn entries(&self) -> Vec<(String, Vec<usize>)> {
        let shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        shapes.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Writes what was recorded to one safetensors file, values stored as `dtype`. Returns the bytes written.
    pub fn save(&self, path: &Path, dtype: DType) -> Result<u64> {
        write_safetensors(path, dtype, &self.entries(), &|name, shape| self.values(name, shape))
    }

    /// Writes what was recorded as shards of at most `sharding.max_bytes` with their index (the
    /// `save_pretrained` naming). Returns the bytes written.
    pub fn save_sharded(&self, sharding: &Sharding, dtype: DType) -> Result<u64> {
        write_sharded(sharding, dtype, &self.entries(), &|name, shape| {
            self.values(name, shape)
        })
    }

    /// Number of tensors recorded.
    pub fn len(&self) -> usize {
        self.shapes.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of values recorded.
    pub fn num_values(&self) -> usize {
        let shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        shapes.values().map(|s| s.iter().product::<usize>()).sum()
    }

    /// The values of one tensor (f32, CPU): a pure function of the seed, the name and the shape.
    pub fn values(&self, name: &str, dims: &[usize]) -> candle_core::Result<Tensor> {
        let mut rng = Gaussian::new(self.seed ^ fnv1a(name));
        let n: usize = dims.iter().product();
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
        Tensor::from_vec(data, dims, &Device::Cpu)
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
        let mut shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        match shapes.get(name) {
            Some(known) if known.as_slice() != s.dims() => {
                candle_core::bail!("generated weight `{name}` requested as {s:?} and as {known:?}")
            }
            Some(_) => {}
            None => {
                shapes.insert(name.to_owned(), s.dims().to_vec());
            }
        }
        // A zero-stride placeholder: modules only keep (or fuse) it, nothing reads its values.
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("generated weight `{name}` requested without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_values_and_shapes_checked() {
        let a = RandomWeights::new(7);
        let b = RandomWeights::new(7);
        a.var_builder().get((4, 3), "x.weight").expect("a");
        b.var_builder().get((4, 3), "x.weight").expect("b");
        let ta = a.values("x.weight", &[4, 3]).expect("a");
        let tb = b.values("x.weight", &[4, 3]).expect("b");
        let diff = (ta - tb).expect("sub").abs().expect("abs").sum_all().expect("sum");
        assert_eq!(diff.to_scalar::<f32>().expect("scalar"), 0.0);
        assert!(a.var_builder().get((3, 4), "x.weight").is_err());
        a.var_builder().get(4, "n.weight").expect("norm");
        assert_eq!(
            a.entries(),
            vec![("n.weight".into(), vec![4]), ("x.weight".into(), vec![4, 3])]
        );
        let norm = a.values("n.weight", &[4]).expect("norm");
        let mean = norm.mean_all().expect("mean").to_scalar::<f32>().expect("scalar");
        assert!((mean - 1.0).abs() < 0.2, "{mean}");
    }
}

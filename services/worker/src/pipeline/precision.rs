//! Precision policy of the VAE. The SDXL VAE overflows in f16, so a f16 pipeline decodes in f32 (as diffusers
//! does with `force_upcast`); on CUDA those f32 convolutions and GEMMs may use TF32 tensor cores, as PyTorch's
//! cuDNN convolutions do by default. A f32 pipeline (the parity reference) never uses TF32, and bf16 has the range
//! to decode in bf16.

use candle_core::{DType, Device};

/// The dtype the VAE decodes in for a pipeline computing in `compute`.
pub fn vae_dtype(compute: DType) -> DType {
    if compute == DType::BF16 {
        DType::BF16
    } else {
        DType::F32
    }
}

/// Whether the VAE of a `compute` pipeline on `device` decodes with TF32 GEMMs: CUDA, a half-precision pipeline
/// and an f32 VAE.
pub fn vae_uses_tf32(device: &Device, compute: DType) -> bool {
    device.is_cuda() && compute != DType::F32 && vae_dtype(compute) == DType::F32
}

/// Allows TF32 for f32 GEMMs on CUDA while alive and restores the previous setting on drop. candle's switch is
/// process-wide; a worker process runs one pipeline, and the f32 parity reference never holds a guard.
pub struct Tf32Scope {
    previous: Option<bool>,
}

impl Tf32Scope {
    /// TF32 on while the scope lives when `on`; nothing changes otherwise.
    pub fn new(on: bool) -> Self {
        if !on {
            return Self { previous: None };
        }
        let previous = candle_core::cuda::gemm_reduced_precision_f32();
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
        Self {
            previous: Some(previous),
        }
    }
}

impl Drop for Tf32Scope {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            candle_core::cuda::set_gemm_reduced_precision_f32(previous);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_decodes_in_f32_and_bf16_in_bf16() {
        assert_eq!(vae_dtype(DType::F16), DType::F32);
        assert_eq!(vae_dtype(DType::F32), DType::F32);
        assert_eq!(vae_dtype(DType::BF16), DType::BF16);
    }

    #[test]
    fn tf32_only_on_cuda_for_a_half_pipeline() {
        assert!(!vae_uses_tf32(&Device::Cpu, DType::F16));
        assert!(!vae_uses_tf32(&Device::Cpu, DType::F32));
    }

    #[test]
    fn a_scope_that_is_off_changes_nothing() {
        let before = candle_core::cuda::gemm_reduced_precision_f32();
        drop(Tf32Scope::new(false));
        assert_eq!(candle_core::cuda::gemm_reduced_precision_f32(), before);
    }
}

//! Scheduler tests: Euler against `scheduler_cases.json`, the Euler update arithmetic on fixture numbers, input
//! validation, and an oracle denoising check for every kind (a model that returns the true noise must lead
//! the loop to the clean sample).

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::*;
use crate::error::ModelError;
use crate::parity::{compare, fixtures_dir, Check, Tolerance};

#[derive(Deserialize)]
struct Cases {
    config: SchedulerConfig,
    cases: std::collections::BTreeMap<String, Case>,
}

#[derive(Deserialize)]
struct Case {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

fn cases() -> Cases {
    let path = fixtures_dir().expect("fixtures").join("scheduler_cases.json");
    crate::model::weights::read_json(&path).expect("scheduler_cases.json")
}

fn sdxl_config() -> SchedulerConfig {
    let path = fixtures_dir()
        .expect("fixtures")
        .join("sdxl/scheduler/scheduler_config.json");
    SchedulerConfig::from_file(&path).expect("scheduler_config.json")
}

/// Max relative error as a `Check` (bound `rel`).
fn relative(name: &str, got: &[f64], want: &[f64], rel: f64) -> Check {
    if got.len() != want.len() {
        return Check::failed(name, format!("length {}, expected {}", got.len(), want.len()));
    }
    let errs: Vec<f64> = got
        .iter()
        .zip(want)
        .map(|(g, w)| if *w == 0.0 { g.abs() } else { ((g - w) / w).abs() })
        .map(|e| if e.is_nan() { f64::INFINITY } else { e })
        .collect();
    let max = errs.iter().copied().fold(0.0, f64::max);
    let mean = errs.iter().sum::<f64>() / errs.len().max(1) as f64;
    Check {
        name: name.to_owned(),
        max_abs: max,
        mean_abs: mean,
        bound: rel,
        ok: max <= rel,
        note: Some("relative".into()),
    }
}

#[test]
fn euler_matches_fixture_schedules() {
    let c = cases();
    for cfg in [&c.config, &sdxl_config()] {
        for (steps, case) in &c.cases {
            let steps: usize = steps.parse().expect("steps");
            let s = EulerDiscrete::new(cfg, steps).expect("euler");
            assert_eq!(s.timesteps(), case.timesteps.as_slice(), "timesteps for {steps} steps");
            let check = relative(&format!("euler sigmas {steps} steps"), s.sigmas(), &case.sigmas, 1e-6);
            println!("{}", check.line());
            assert!(check.ok, "{}", check.line());
            let check = relative(
                &format!("euler init_noise_sigma {steps} steps"),
                &[s.init_noise_sigma()],
                &[case.init_noise_sigma],
                1e-6,
            );
            println!("{}", check.line());
            assert!(check.ok, "{}", check.line());
        }
    }
}

#[test]
fn euler_update_arithmetic_on_fixture_numbers() {
    let c = cases();
    let case = &c.cases["4"];
    let mut s = build_scheduler(SchedulerKind::Euler, &c.config, 4).expect("euler");
    let t = candle_core::safetensors::load(
        fixtures_dir()
            .expect("fixtures")
            .join("cases/sdxl_two_objects/tensors.safetensors"),
        &Device::Cpu,
    )
    .expect("tensors");
    let noise = &t["loop.initial_noise"];
    let x = (noise * s.init_noise_sigma()).expect("x");
    let xs: Vec<f64> = x
        .flatten_all()
        .and_then(|v| v.to_vec1::<f32>())
        .expect("vec")
        .iter()
        .map(|v| f64::from(*v))
        .collect();
    // eps = 0: the latents stay.
    let zero = x.zeros_like().expect("zeros");
    let same = s.step(&zero, 0, &x).expect("step");
    let check = compare("euler step eps=0", &same, &x, Tolerance::Exact);
    println!("{}", check.line());
    assert!(check.ok, "{}", check.line());
    // Hand-computed model input and update with eps = 0.5 * noise - 0.25.
    let (s0, s1) = (case.sigmas[0], case.sigmas[1]);
    let eps = noise.affine(0.5, -0.25).expect("eps");
    let ns: Vec<f64> = noise
        .flatten_all()
        .and_then(|v| v.to_vec1::<f32>())
        .expect("vec")
        .iter()
        .map(|v| f64::from(*v))
        .collect();
    let want_in: Vec<f32> = xs.iter().map(|x| (x / (s0 * s0 + 1.0).sqrt()) as f32).collect();
    let want_step: Vec<f32> = xs
        .iter()
        .zip(&ns)
        .map(|(x, n)| (x + (0.5 * n - 0.25) * (s1 - s0)) as f32)
        .collect();
    let shape = x.shape().clone();
    let want_in = Tensor::from_vec(want_in, &shape, &Device::Cpu).expect("t");
    let want_step = Tensor::from_vec(want_step, &shape, &Device::Cpu).expect("t");
    let got_in = s.scale_model_input(&x, 0).expect("scale");
    let check = compare(
        "euler scale_model_input step 0",
        &got_in,
        &want_in,
        Tolerance::Scaled(1e-6),
    );
    println!("{}", check.line());
    assert!(check.ok, "{}", check.line());
    let got = s.step(&eps, 0, &x).expect("step");
    let check = compare("euler step 0 hand-computed", &got, &want_step, Tolerance::Scaled(1e-6));
    println!("{}", check.line());
    assert!(check.ok, "{}", check.line());
}

#[test]
fn steps_out_of_range_are_invalid_input_naming_steps() {
    let cfg = sdxl_config();
    for kind in SchedulerKind::ALL {
        for steps in [0, 1001] {
            let err = build_scheduler(kind, &cfg, steps).expect_err("out of range");
            assert!(
                matches!(err, ModelError::Invalid(ref e) if e.field == "steps" && e.value == steps.to_string()),
                "{kind}: {err}"
            );
        }
        assert!(build_scheduler(kind, &cfg, 1000).is_ok(), "{kind} accepts 1000 steps");
        assert!(build_scheduler(kind, &cfg, 1).is_ok(), "{kind} accepts 1 step");
    }
}

#[test]
fn kinds_parse_from_names() {
    for (name, kind) in [
        ("euler", SchedulerKind::Euler),
        ("ddim", SchedulerKind::Ddim),
        ("dpmpp_2m_karras", SchedulerKind::DpmPp2mKarras),
    ] {
        assert_eq!(name.parse::<SchedulerKind>(), Ok(kind));
        assert_eq!(kind.to_string(), name);
    }
    let err = "Euler a".parse::<SchedulerKind>().expect_err("unknown");
    assert_eq!(err.field, "scheduler");
}

#[test]
fn step_index_out_of_range_is_an_error() {
    let mut s = build_scheduler(SchedulerKind::Euler, &sdxl_config(), 4).expect("euler");
    let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).expect("zeros");
    assert!(s.step(&x, 4, &x).is_err());
    assert!(s.scale_model_input(&x, 4).is_err());
}

/// Runs the loop with an oracle model that knows the clean sample `x0` and the noise `n` and returns the exact
/// epsilon (or v) for the model input it is given.
fn oracle_loop(kind: SchedulerKind, cfg: &SchedulerConfig, steps: usize, x0: &Tensor, n: &Tensor) -> Tensor {
    let mut s = build_scheduler(kind, cfg, steps).expect("scheduler");
    let mut x = s.add_noise(x0, n, 0).expect("add_noise");
    for i in 0..s.timesteps().len() {
        let input = s.scale_model_input(&x, i).expect("scale");
        let (alpha, sigma) = s.noise_level(i).expect("level");
        let eps = ((input - (x0 * alpha).expect("a")).expect("d") / sigma).expect("eps");
        let out = match cfg.prediction_type {
            PredictionType::Epsilon => eps,
            PredictionType::VPrediction => ((eps * alpha).expect("v") - (x0 * sigma).expect("v")).expect("v"),
        };
        x = s.step(&out, i, &x).expect("step");
    }
    x
}

#[test]
fn every_kind_denoises_with_an_oracle_model() {
    let dev = Device::Cpu;
    let x0 = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).expect("x0");
    let n = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).expect("n");
    for prediction in [PredictionType::Epsilon, PredictionType::VPrediction] {
        let mut cfg = sdxl_config();
        cfg.prediction_type = prediction;
        for steps in [1, 4, 10, 30] {
            for kind in [SchedulerKind::Euler, SchedulerKind::DpmPp2mKarras] {
                let got = oracle_loop(kind, &cfg, steps, &x0, &n);
                let check = compare(
                    &format!("{kind} {prediction:?} {steps} steps -> x0"),
                    &got,
                    &x0,
                    Tolerance::LOOP,
                );
                println!("{}", check.line());
                assert!(check.ok, "{}", check.line());
            }
            // DDIM ends at alphas_cumprod[0] unless set_alpha_to_one.
            let a0 = cfg.alphas_cumprod()[0];
            let want = ((&x0 * a0.sqrt()).expect("w") + (&n * (1.0 - a0).sqrt()).expect("w")).expect("w");
            let got = oracle_loop(SchedulerKind::Ddim, &cfg, steps, &x0, &n);
            let check = compare(
                &format!("ddim {prediction:?} {steps} steps"),
                &got,
                &want,
                Tolerance::LOOP,
            );
            println!("{}", check.line());
            assert!(check.ok, "{}", check.line());
            let mut one = cfg.clone();
            one.set_alpha_to_one = Some(true);
            let got = oracle_loop(SchedulerKind::Ddim, &one, steps, &x0, &n);
            let check = compare(
                &format!("ddim alpha_to_one {prediction:?} {steps}"),
                &got,
                &x0,
                Tolerance::LOOP,
            );
            println!("{}", check.line());
            assert!(check.ok, "{}", check.line());
        }
    }
}

#[test]
fn ddim_and_dpm_schedules_are_sane() {
    let cfg = sdxl_config();
    let ddim = Ddim::new(&cfg, 4).expect("ddim");
    assert_eq!(ddim.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
    let dpm = DpmSolverMultistep::new(&cfg, 30, true).expect("dpm");
    let ts = dpm.timesteps();
    assert_eq!(ts.len(), 30);
    assert!(ts.windows(2).all(|w| w[0] >= w[1]), "{ts:?}");
    assert_eq!(ts[0], 999.0);
    assert_eq!(ts[29], 0.0);
    let sig = dpm.sigmas();
    let train = cfg.train_sigmas();
    assert_eq!(sig.len(), 31);
    assert!(
        (sig[0] - train[999]).abs() < 1e-5 && (sig[29] - train[0]).abs() < 1e-6,
        "{sig:?}"
    );
    assert_eq!(sig[30], 0.0);
    assert!(sig.windows(2).all(|w| w[0] > w[1]));
}

/// Relative error of the loop's final latents on Gaussian data x0 ~ N(0, c^2), whose ideal denoiser
/// `D(x, s) = x c^2 / (c^2 + s^2)` makes the probability-flow ODE exact: `x(0) = x(s0) c / sqrt(c^2 + s0^2)`.
fn gaussian_ode_error(kind: SchedulerKind, cfg: &SchedulerConfig, steps: usize) -> f64 {
    let c2 = 0.25f64;
    let n = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).expect("n");
    let mut s = build_scheduler(kind, cfg, steps).expect("scheduler");
    let zeros = n.zeros_like().expect("zeros");
    let mut x = s.add_noise(&zeros, &n, 0).expect("add_noise");
    let (a0, v0) = s.noise_level(0).expect("level");
    let s0 = v0 / a0;
    for i in 0..s.timesteps().len() {
        let input = s.scale_model_input(&x, i).expect("scale");
        let (alpha, sigma_vp) = s.noise_level(i).expect("level");
        let sig = sigma_vp / alpha;
        // eps = (x_ve - D(x_ve)) / sig with x_ve = input / alpha.
        let eps = (input * (sig / (c2 + sig * sig) / alpha)).expect("eps");
        x = s.step(&eps, i, &x).expect("step");
    }
    let want = (&n * (s0 * c2.sqrt() / (c2 + s0 * s0).sqrt())).expect("want");
    let err = (x - &want)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>());
    let scale = want.abs().and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>());
    f64::from(err.expect("err")) / f64::from(scale.expect("scale"))
}

/// DDIM equals Euler on this ODE (both are first order in the same variable), both converge at first order,
/// and DPM-Solver++(2M) at second order (until the final first-order step from sigma_min to 0 dominates).
#[test]
fn samplers_solve_the_gaussian_ode() {
    let cfg = sdxl_config();
    let mut ddim_cfg = cfg.clone();
    ddim_cfg.set_alpha_to_one = Some(true);
    let mut errs = Vec::new();
    for steps in [10, 30] {
        let euler = gaussian_ode_error(SchedulerKind::Euler, &cfg, steps);
        let ddim = gaussian_ode_error(SchedulerKind::Ddim, &ddim_cfg, steps);
        let dpm = gaussian_ode_error(SchedulerKind::DpmPp2mKarras, &cfg, steps);
        println!(
            "gaussian ODE {steps} steps: relative error euler {euler:.3e} ddim {ddim:.3e} dpmpp_2m_karras {dpm:.3e}"
        );
        assert!((euler - ddim).abs() < 1e-5, "euler {euler} vs ddim {ddim}");
        errs.push((euler, dpm));
    }
    let ((e10, d10), (e30, d30)) = (errs[0], errs[1]);
    assert!(e10 < 0.3 && e30 < e10 / 2.0, "euler does not converge: {e10} -> {e30}");
    assert!(d30 < d10 / 8.0, "dpm++ 2m is not second order: {d10} -> {d30}");
    assert!(d30 < e30 / 10.0, "dpm++ 2m {d30} not far better than euler {e30}");
}

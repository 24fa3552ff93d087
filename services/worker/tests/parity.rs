//! Golden parity: every case of the fixture folder, every tensor within the README tolerances.

mod common;

use mip_worker::parity::{run_dir, RunOptions};

#[test]
fn every_fixture_tensor_is_within_tolerance() {
    let dir = common::fixtures();
    let checks = run_dir(&dir, &RunOptions::default(), &mut |c| println!("{}", c.line())).expect("fixture folder runs");
    let failed: Vec<String> = checks.iter().filter(|c| !c.ok).map(|c| c.line()).collect();
    assert!(
        checks.len() >= 100,
        "expected every tensor of every case to be checked, got {}",
        checks.len()
    );
    assert!(
        failed.is_empty(),
        "{} checks failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    // Every stage of the method is covered.
    for needle in [
        "tokenizer[",
        "scheduler[",
        "preprocess/",
        "plain_unet/noise_pred",
        "ref.image_embeds",
        "ref.penultimate_hidden_states",
        "text.entity_embeds",
        "layer0.object_weights",
        "unet.noise_pred",
        "loop.final_latents",
        "vae.decoded",
        "expected.png",
        ".bin == .safetensors",
    ] {
        assert!(
            checks.iter().any(|c| c.name.contains(needle)),
            "no check named like {needle:?}"
        );
    }
}

//! `mip`: the command-line front end of MIP Cluster.
//!
//! - `generate`: run the whole pipeline in this process (embedded) on a model bundle or the built-in demo model;
//! - `parity`: check the implementation against a golden fixture folder;
//! - `bench`: per-stage timings;
//! - `model demo`: write the built-in demo model;
//! - `serve worker` / `serve coordinator`: run a worker node or the coordinator (gRPC);
//! - `workers`: show the model, queue and counters of running workers.
//!
//! Each subcommand lives in its own module; this file only parses arguments and reports errors as one line.

mod bench;
mod bench_sdxl;
mod device;
mod generate;
mod model;
mod parity;
mod serve;
mod workers;

use clap::{Parser, Subcommand};

/// Multi-subject personalised image generation (MIP-Adapter on SDXL).
#[derive(Debug, Parser)]
#[command(name = "mip", version, about)]
struct Cli {
    /// Print progress logs on stderr.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images in this process from a prompt and reference photos of each subject.
    Generate(generate::Args),
    /// Compare every tensor of a fixture folder against our implementation.
    Parity(parity::Args),
    /// Time each stage of the pipeline.
    Bench(bench::Args),
    /// Model utilities.
    #[command(subcommand)]
    Model(model::Command),
    /// Run a service.
    #[command(subcommand)]
    Serve(serve::Command),
    /// Show the model, device, queue and counters of running workers.
    Workers(workers::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a, cli.verbose),
        Command::Parity(a) => parity::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Model(c) => model::run(c),
        Command::Serve(c) => serve::run(c, cli.verbose),
        Command::Workers(a) => workers::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

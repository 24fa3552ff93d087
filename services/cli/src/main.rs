//! `mip`: the command-line front end of MIP Cluster.
//!
//! - `generate`: one request on a cluster (`--coordinator`) or on an embedded one started in this process;
//! - `submit`: a JSONL / YAML manifest of requests, resumable; `watch`, `jobs`, `cancel`: jobs on a coordinator;
//! - `workers`: the workers of a coordinator, or of a list of worker URLs (model, queue, counters);
//! - `serve worker` / `serve coordinator` / `serve all`: run the services (gRPC);
//! - `parity`: check the implementation against a golden fixture folder; `bench`: per-stage timings (`--sdxl`: SDXL shapes);
//!   `bench-cluster`: coordinator overhead per task and throughput against 1, 2 and 4 workers;
//! - `model demo`: write the built-in demo model; `config schema`: the JSON Schema of a service's config file;
//!   `completions`: a shell completion script.
//!
//! `-v` / `-vv` / `-vvv` / `-q` set the log level of every subcommand ([`verbosity`]).
//!
//! Each subcommand lives in its own module (`client` holds the shared gRPC connection: URL, bearer token, TLS;
//! `local` an in-process cluster; `outputs` the PNG + sidecar writer); this file only parses arguments and
//! reports errors as one line with a non-zero exit.

mod bench;
mod bench_blocks;
mod bench_cluster;
mod bench_cold;
mod bench_ops;
mod bench_sdxl;
mod client;
mod config_cmd;
mod device;
mod eval;
mod eval_concept101;
mod generate;
mod jobs;
mod local;
mod manifest;
mod model;
mod outputs;
mod parity;
mod retry;
mod serve;
mod serve_all;
mod submit;
mod trace;
mod verbosity;
mod workers;
mod yaml;

use clap::{Parser, Subcommand};

/// Multi-subject personalised image generation (MIP-Adapter on SDXL).
#[derive(Debug, Parser)]
#[command(name = "mip", version, about)]
struct Cli {
    #[command(flatten)]
    verbosity: verbosity::Verbosity,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate images from a prompt and reference photos of each subject (on --coordinator, or embedded).
    Generate(Box<generate::Args>),
    /// Run every request of a JSONL or YAML manifest on a coordinator (resumable).
    Submit(submit::Args),
    /// Follow a job until it ends.
    Watch(jobs::WatchArgs),
    /// List the coordinator's jobs, newest first.
    Jobs(jobs::JobsArgs),
    /// Cancel a job.
    Cancel(jobs::CancelArgs),
    /// Compare every tensor of a fixture folder against our implementation.
    Parity(parity::Args),
    /// Score generated images: CLIP-T against the prompt, CLIP-I and DINO against each subject's references.
    Eval(eval::Args),
    /// Time each stage of the pipeline.
    Bench(bench::Args),
    /// Measure the coordinator's overhead per task and the throughput against 1, 2 and 4 workers.
    BenchCluster(bench_cluster::Args),
    /// Model utilities.
    #[command(subcommand)]
    Model(model::Command),
    /// Run a service.
    #[command(subcommand)]
    Serve(serve::Command),
    /// Configuration utilities: the JSON Schema of a service's config file.
    #[command(subcommand)]
    Config(config_cmd::Command),
    /// Show the health, load, model and counters of workers (via --coordinator, or --workers URLs directly).
    Workers(workers::Args),
    /// Print a shell completion script (e.g. `mip completions bash > /etc/bash_completion.d/mip`).
    Completions(CompletionsArgs),
}

#[derive(Debug, clap::Args)]
struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

fn main() {
    let cli = Cli::parse();
    let v = cli.verbosity;
    // Services and `generate` set up their own logging; the client commands log with `-v` only.
    let _logs = match &cli.command {
        Command::Serve(_) | Command::Generate(_) | Command::Completions(_) => None,
        _ if v.client_logs() => serve_all::init_logs(v, "mip").ok(),
        _ => None,
    };
    let result = match cli.command {
        Command::Generate(a) => generate::run(*a, v),
        Command::Submit(a) => submit::run(a),
        Command::Watch(a) => jobs::watch(a),
        Command::Jobs(a) => jobs::jobs(a),
        Command::Cancel(a) => jobs::cancel(a),
        Command::Parity(a) => parity::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchCluster(a) => bench_cluster::run(a),
        Command::Model(c) => model::run(c),
        Command::Serve(c) => serve::run(c, v),
        Command::Config(c) => config_cmd::run(c),
        Command::Workers(a) => workers::run(a),
        Command::Completions(a) => {
            clap_complete::generate(
                a.shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "mip",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

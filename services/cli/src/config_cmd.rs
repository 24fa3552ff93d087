//! `mip config schema worker|coordinator|all`: the JSON Schema of a service's configuration file, generated from
//! the very structs the loader deserialises into (so it cannot drift from the code), for editors, CI and the Helm
//! chart's checks. Every object refuses unknown fields and every field has a default, as the loader does.

use anyhow::Result;
use mip_coordinator::config::CoordinatorConfig;
use mip_worker::config::WorkerConfig;

use crate::serve_all::AllConfig;

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the JSON Schema of a service's configuration file.
    Schema(SchemaArgs),
}

#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    /// Whose configuration: `worker`, `coordinator`, or `all` (the file of `mip serve all`).
    #[arg(value_enum)]
    service: Service,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Service {
    Worker,
    Coordinator,
    All,
}

pub fn run(cmd: Command) -> Result<()> {
    let Command::Schema(a) = cmd;
    let schema = match a.service {
        Service::Worker => schemars::schema_for!(WorkerConfig),
        Service::Coordinator => schemars::schema_for!(CoordinatorConfig),
        Service::All => schemars::schema_for!(AllConfig),
    };
    println!("{}", serde_json::to_string_pretty(&schema)?);
    Ok(())
}

//! `hashgrid`: the buyer CLI. Today: inspect job files offline.

use anyhow::Context;
use clap::{Parser, Subcommand};
use hashgrid_protocol::{JobLimits, load_job_file};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hashgrid",
    version,
    about = "hashgrid: buy GPU compute on a peer-to-peer market"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Job files.
    #[command(subcommand)]
    Job(JobCommand),
}

#[derive(Subcommand)]
enum JobCommand {
    /// Parse and check a job file and the files it names; print its spec id and buffers.
    ///
    /// Example: hashgrid job inspect examples/kernels/saxpy/job.toml
    Inspect {
        /// The job file (TOML).
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Job(JobCommand::Inspect { file, json }) => {
            let job = load_job_file(&file, &JobLimits::default())?;
            if json {
                let out = serde_json::json!({
                    "spec_id": job.spec.id().to_string(),
                    "spec": job.spec,
                    "inputs": job.inputs.iter().map(|(id, b)| (id.to_string(), b.len())).collect::<std::collections::BTreeMap<_, _>>(),
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&out).context("encoding JSON")?
                );
            } else {
                println!("job      {}", job.spec.name);
                println!("spec id  {}", job.spec.id());
                for b in &job.spec.buffers {
                    let kind = match b.init {
                        hashgrid_protocol::BufferInit::Zeroed => "zeroed".to_string(),
                        hashgrid_protocol::BufferInit::Blob(id) => format!("input {}", id.short()),
                    };
                    let out = if b.output { " output" } else { "" };
                    println!("buffer   {:<12} {:>12} bytes  {kind}{out}", b.name, b.size);
                }
                for (i, p) in job.spec.passes.iter().enumerate() {
                    let shader = &job.spec.shaders[p.shader as usize].name;
                    println!(
                        "pass {}   {shader}:{} workgroups {:?}",
                        i + 1,
                        p.entry,
                        p.workgroups
                    );
                }
            }
        }
    }
    Ok(())
}

//! `hashgrid-node`: the site daemon. Today it manages the node identity; `run` arrives with the
//! network (issue 5).

use clap::{Parser, Subcommand};
use hashgrid_node::DataDir;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "hashgrid-node",
    version,
    about = "hashgrid site daemon: sell GPU capacity"
)]
struct Cli {
    /// Data directory (default: $XDG_DATA_HOME/hashgrid).
    #[arg(long, global = true, env = "HASHGRID_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print this node's PeerId, creating its identity key if needed.
    ///
    /// Example: hashgrid-node id --data-dir /var/lib/hashgrid
    Id,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let dir = DataDir::new(cli.data_dir.unwrap_or_else(DataDir::default_root));
    match cli.command {
        Command::Id => {
            let key = dir.load_or_create_identity()?;
            println!("{}", key.peer_id());
        }
    }
    Ok(())
}

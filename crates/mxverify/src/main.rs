//! `mxverify`: verify and be verified on Matrix.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mxverify::demo::{self, DemoOptions, Scenario, Transport};
use mxverify::output::Ending;

#[derive(Parser)]
#[command(
    name = "mxverify",
    version,
    about = "Matrix key verification (SAS and QR) from the command line"
)]
struct Cli {
    /// One JSON object per line on standard output (a stable interface; see the README).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Two devices verify each other in this process, through an in-memory homeserver.
    Demo {
        /// Which story to tell: a successful verification, or one of the ways it fails.
        #[arg(long, value_enum, default_value_t = Scenario::Verify)]
        scenario: Scenario,
        /// How the devices talk.
        #[arg(long, value_enum, default_value_t = Transport::ToDevice)]
        transport: Transport,
        /// Make the keys (and so the emoji) reproducible. Never use for real verifications.
        #[arg(long)]
        seed: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            scenario,
            transport,
            seed,
        } => demo::run(
            DemoOptions {
                scenario,
                transport,
                json: cli.json,
                seed,
            },
            &mut std::io::stdout().lock(),
        ),
    };
    match result {
        Ok(ending) => ExitCode::from(ending as u8),
        Err(e) => {
            eprintln!("mxverify: {e}");
            ExitCode::from(Ending::Error as u8)
        }
    }
}

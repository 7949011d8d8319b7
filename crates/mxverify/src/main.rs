//! `mxverify`: verify and be verified on Matrix.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mxverify::demo::{self, DemoMethod, DemoOptions, Scenario, Transport};
use mxverify::output::Ending;
use mxverify::qr_tool;

#[derive(Parser)]
#[command(name = "mxverify", version, about = "Matrix key verification (SAS and QR) from the command line")]
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
        /// Compare emoji (sas) or scan a QR code (qr).
        #[arg(long, value_enum, default_value_t = DemoMethod::Sas)]
        method: DemoMethod,
        /// With --method qr: also write the QR code to this PNG file.
        #[arg(long, value_name = "FILE")]
        qr_png: Option<PathBuf>,
        /// Make the keys (and so the emoji) reproducible. Never use for real verifications.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Read, show and draw verification QR codes.
    #[command(subcommand)]
    Qr(QrCommand),
}

#[derive(Subcommand)]
enum QrCommand {
    /// Read a verification QR code from a PNG/JPEG picture, or from its base64 payload, and
    /// print what it says.
    Decode {
        /// A picture of the code.
        #[arg(required_unless_present = "base64")]
        picture: Option<PathBuf>,
        /// The raw payload as base64 instead of a picture.
        #[arg(long, conflicts_with = "picture")]
        base64: Option<String>,
    },
    /// Draw a payload (base64) as a QR code in the terminal, and optionally as a PNG file.
    Show {
        /// The raw payload as base64.
        base64: String,
        /// Also write the code to this PNG file.
        #[arg(long, value_name = "FILE")]
        png: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    let result = match cli.command {
        Command::Demo { scenario, transport, method, qr_png, seed } => {
            let opts = DemoOptions { scenario, transport, json: cli.json, seed, method, qr_png };
            if let Err(e) = opts.check() {
                eprintln!("mxverify: {e}");
                return ExitCode::from(2);
            }
            demo::run(opts, &mut out)
        }
        Command::Qr(QrCommand::Decode { picture, base64 }) => {
            qr_tool::decode(picture.as_deref(), base64.as_deref(), cli.json, &mut out)
        }
        Command::Qr(QrCommand::Show { base64, png }) => qr_tool::show(&base64, png.as_deref(), &mut out),
    };
    match result {
        Ok(ending) => ExitCode::from(ending as u8),
        Err(e) => {
            eprintln!("mxverify: {e}");
            ExitCode::from(Ending::Error as u8)
        }
    }
}

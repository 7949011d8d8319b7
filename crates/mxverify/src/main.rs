//! `mxverify`: verify and be verified on Matrix.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use mxverify::demo::{self, DemoMethod, DemoOptions, Scenario, Transport};
use mxverify::output::Ending;
use mxverify::{commands, qr_tool};

#[derive(Parser)]
#[command(name = "mxverify", version, about = "Matrix key verification (SAS and QR) from the command line")]
struct Cli {
    /// One JSON object per line on standard output, commands as JSON lines on standard input (a
    /// stable interface; see the README).
    #[arg(long, global = true)]
    json: bool,
    /// Where this device's state lives (default: $MXVERIFY_STATE_DIR, or the platform's data
    /// directory).
    #[arg(long, global = true, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Send to-device verification messages Olm-encrypted (by default they go in the clear, as
    /// Element's do; encrypted ones are always understood).
    #[arg(long, global = true, env = "MXVERIFY_ENCRYPT_TO_DEVICE")]
    encrypt_to_device: bool,
    /// The language of the emoji names, e.g. `de` or `pt_BR` (default: from LC_ALL, LC_MESSAGES
    /// or LANG; English when there is no translation).
    #[arg(long, global = true, value_name = "LANG")]
    lang: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum MethodArg {
    /// Compare emoji or numbers.
    Sas,
    /// Show or scan a QR code (SAS stays available).
    Qr,
}

impl MethodArg {
    fn name(self) -> &'static str {
        match self {
            Self::Sas => "sas",
            Self::Qr => "qr",
        }
    }
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
    /// Log in with a password; creates this device's keys and publishes them.
    Login {
        /// The homeserver's base URL, e.g. https://matrix.example.org (default: found from the
        /// user ID's server name through `.well-known/matrix/client`).
        #[arg(long)]
        homeserver: Option<String>,
        /// User name or full user ID (with a password).
        #[arg(long, required_unless_present = "access_token")]
        user: Option<String>,
        /// The password (or set MXVERIFY_PASSWORD).
        #[arg(long, env = "MXVERIFY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Use an existing login's access token instead of a password (or set
        /// MXVERIFY_ACCESS_TOKEN); its user and device are asked of the homeserver.
        #[arg(long, env = "MXVERIFY_ACCESS_TOKEN", hide_env_values = true)]
        access_token: Option<String>,
        /// Reuse or choose this device ID.
        #[arg(long)]
        device_id: Option<String>,
        /// Forget another account's state in this state directory.
        #[arg(long)]
        replace: bool,
        /// Allow plain http:// to a homeserver that is not on this machine.
        #[arg(long)]
        allow_insecure_http: bool,
    },
    /// Ask USER to verify: to-device for your own devices or a named device, in a direct-message
    /// room for another user; then drive the verification to its end.
    Request {
        /// The user to verify (yourself for your other devices).
        user: String,
        /// Only this device (to-device).
        #[arg(long)]
        device: Option<String>,
        /// In a direct-message room (created if needed).
        #[arg(long, conflicts_with_all = ["room", "device"])]
        dm: bool,
        /// In this room.
        #[arg(long, conflicts_with = "device")]
        room: Option<String>,
        /// Emoji (sas) or QR code (qr).
        #[arg(long, value_enum, default_value_t = MethodArg::Sas)]
        method: MethodArg,
        /// With --method qr: also write our QR code to this PNG file.
        #[arg(long, value_name = "FILE")]
        qr_png: Option<PathBuf>,
    },
    /// Wait for verification requests and answer them.
    Listen {
        /// Which methods to offer: sas, or qr (which offers SAS too).
        #[arg(long, value_enum, default_value_t = MethodArg::Sas)]
        method: MethodArg,
        /// Stop after the first verification ends.
        #[arg(long)]
        once: bool,
        /// With --method qr: also write our QR code to this PNG file.
        #[arg(long, value_name = "FILE")]
        qr_png: Option<PathBuf>,
    },
    /// List a user's devices (default: yours) with their verification state.
    Devices {
        /// The user.
        user: Option<String>,
    },
    /// List what this device has verified.
    Trust,
    /// Join a room you were invited to (for in-room verification; `listen` joins by itself).
    Join {
        /// The room ID.
        room: String,
    },
    /// Cross-signing keys.
    #[command(subcommand)]
    CrossSigning(CrossSigningCommand),
}

#[derive(Subcommand)]
enum CrossSigningCommand {
    /// Create and publish master, self-signing and user-signing keys, and sign this device.
    Bootstrap {
        /// The account password, if the homeserver asks for it (or set MXVERIFY_PASSWORD).
        #[arg(long, env = "MXVERIFY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Replace keys published by another device, and existing secret storage.
        #[arg(long)]
        replace: bool,
    },
    /// Restore the private keys from secret storage with the recovery key (or its passphrase).
    Recover {
        /// The recovery key (or set MXVERIFY_RECOVERY_KEY, which keeps it out of the process list).
        #[arg(long, env = "MXVERIFY_RECOVERY_KEY", hide_env_values = true)]
        recovery_key: Option<String>,
        /// The passphrase the secret-storage key was made from (or set MXVERIFY_RECOVERY_PASSPHRASE).
        #[arg(long, env = "MXVERIFY_RECOVERY_PASSPHRASE", hide_env_values = true)]
        passphrase: Option<String>,
    },
    /// Which cross-signing private keys this device holds, and whether there is secret storage.
    Status,
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
            let lang = mxverify::output::language(cli.lang.as_deref());
            let opts = DemoOptions { scenario, transport, json: cli.json, seed, method, qr_png, lang };
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
        other => {
            let dir = commands::state_dir(cli.state_dir);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
            let result = runtime.block_on(async {
                let qr_png = match &other {
                    Command::Request { qr_png, .. } | Command::Listen { qr_png, .. } => qr_png.clone(),
                    _ => None,
                };
                let lang = mxverify::output::language(cli.lang.as_deref());
                let mut ui = commands::Ui { json: cli.json, out: &mut out, qr_png, lang };
                match other {
                    Command::Login {
                        homeserver,
                        user,
                        password,
                        access_token,
                        device_id,
                        replace,
                        allow_insecure_http,
                    } => {
                        let credentials = match (access_token, user, password) {
                            (Some(token), _, _) => Some(mxverify_client::Credentials::AccessToken(token)),
                            (None, Some(user), Some(password)) => {
                                Some(mxverify_client::Credentials::Password { user, password, device_id })
                            }
                            _ => None,
                        };
                        match credentials {
                            Some(c) => {
                                let hs = homeserver.as_deref();
                                commands::login(&dir, hs, c, replace, allow_insecure_http, &mut ui).await
                            }
                            None => Err(mxverify_client::DeviceError::Refused(
                                "give --password (or MXVERIFY_PASSWORD), or --access-token".into(),
                            )),
                        }
                    }
                    Command::Request { user, device, dm, room, method, .. } => {
                        let target = match (device, dm, room) {
                            (_, _, Some(room)) => commands::Target::Room(room),
                            (_, true, None) => commands::Target::Dm,
                            (Some(d), false, None) => commands::Target::ToDevice(Some(d)),
                            (None, false, None) => commands::Target::Auto,
                        };
                        commands::request(&dir, &user, target, method.name(), cli.encrypt_to_device, &mut ui).await
                    }
                    Command::Listen { method, once, .. } => {
                        commands::listen(&dir, method.name(), once, cli.encrypt_to_device, &mut ui).await
                    }
                    Command::Devices { user } => commands::devices(&dir, user.as_deref(), &mut ui).await,
                    Command::Trust => commands::trust(&dir, &mut ui),
                    Command::Join { room } => commands::join(&dir, &room, &mut ui).await,
                    Command::CrossSigning(CrossSigningCommand::Bootstrap { password, replace }) => {
                        commands::bootstrap(&dir, password.as_deref(), replace, &mut ui).await
                    }
                    Command::CrossSigning(CrossSigningCommand::Recover { recovery_key, passphrase }) => {
                        commands::recover(&dir, recovery_key.as_deref(), passphrase.as_deref(), &mut ui).await
                    }
                    Command::CrossSigning(CrossSigningCommand::Status) => {
                        commands::cross_signing_status(&dir, &mut ui).await
                    }
                    Command::Demo { .. } | Command::Qr(_) => unreachable!("handled above"),
                }
            });
            match result {
                Ok(ending) => return ExitCode::from(ending as u8),
                Err(e) => {
                    let ending = commands::ending_for(&e);
                    let message = commands::explain_error(&e);
                    if cli.json {
                        println!("{}", serde_json::json!({"event": "error", "message": message, "code": ending as u8}));
                    }
                    eprintln!("mxverify: {message}");
                    return ExitCode::from(ending as u8);
                }
            }
        }
    };
    match result {
        Ok(ending) => ExitCode::from(ending as u8),
        // The reader went away (`| head`): nothing left to say to anyone.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::from(Ending::Error as u8),
        Err(e) => {
            eprintln!("mxverify: {e}");
            ExitCode::from(Ending::Error as u8)
        }
    }
}

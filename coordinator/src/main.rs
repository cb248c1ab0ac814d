use std::io::IsTerminal;

use clap::Parser;
use tessera_coordinator::cli::roles::LogFormat;
use tracing_subscriber::EnvFilter;

/// Logs go to stderr, filtered by TESSERA_LOG (default: warnings), as text or as one JSON
/// object per line (`--log-format json`: tracing's JSON layer, for a log stack).
fn init_logging(format: LogFormat) {
    // In JSON the status lines ("job … succeeded") are log events too: on by default.
    let default = match format {
        LogFormat::Json => format!("warn,{}=info", tessera_worker::status::TARGET),
        LogFormat::Text => "warn".to_string(),
    };
    let filter = EnvFilter::try_from_env("TESSERA_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => {
            tessera_worker::status::set_json(true);
            logs.json().with_current_span(false).init()
        }
        LogFormat::Text => {
            // Colours only for a person at a terminal: logs sent to a file or a journal stay
            // plain text.
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            logs.with_ansi(colour).init()
        }
    }
}

fn main() {
    let cli = tessera_coordinator::cli::Cli::parse();
    init_logging(cli.log_format());
    if let Err(e) = tessera_coordinator::cli::run(cli) {
        // A user's mistake gets the chain of causes on one line each, never a backtrace.
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

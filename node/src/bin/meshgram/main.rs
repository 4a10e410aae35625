//! `meshgram`: the user's client node — sign in, manage sessions, and (with `up`) run a whole
//! local network.

#[macro_use]
mod output {
    /// `println!` that does not panic when stdout is closed (`meshgram … | head`): a reader that
    /// has gone needs no more output.
    macro_rules! outln {
        ($($arg:tt)*) => {{
            use std::io::Write as _;
            if writeln!(std::io::stdout(), $($arg)*).is_err() {
                std::process::exit(0);
            }
        }};
    }
}

mod app;
mod cli;
mod up;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    meshgram_node::server::service::init_tracing("warn", meshgram_node::server::service::LogFormat::Text);
    let json = args.json;
    match cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            e.report(json);
            std::process::ExitCode::FAILURE
        }
    }
}

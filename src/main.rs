use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = medvlm::cli::Cli::parse();
    match medvlm::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the context chain joined with ": ".
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

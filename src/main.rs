use std::process::ExitCode;

use clap::Parser;

/// Where a user reports a bug (printed when medvlm panics).
const REPORT: &str = "please report it to the medvlm maintainers (the issue tracker of the \
                      repository you got medvlm from) with the command you ran; \
                      RUST_BACKTRACE=1 shows where it happened";

/// Whether an error chain ends in a closed pipe (`medvlm ... | head`).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn install_panic_hook() {
    let user_wants_backtrace = std::env::var_os("RUST_BACKTRACE").is_some();
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = medvlm::panic_message(info.payload()).unwrap_or("unknown panic");
        // println! panics when the reader of stdout has gone away: end quietly, as cat and
        // ripgrep do.
        if msg.contains("Broken pipe") || msg.contains("os error 32") {
            std::process::exit(0);
        }
        if user_wants_backtrace {
            default(info);
            return;
        }
        let at = info
            .location()
            .map(|l| format!(" (at {}:{})", l.file(), l.line()))
            .unwrap_or_default();
        let msg = msg.lines().next().unwrap_or("").to_string();
        eprintln!("error: internal error: {msg}{at}; this is a bug in medvlm: {REPORT}");
    }));
}

fn main() -> ExitCode {
    install_panic_hook();
    medvlm::memory::keep_freed_memory();
    medvlm::device::settle_thread_count();
    let cli = medvlm::cli::Cli::parse();
    let result = std::panic::catch_unwind(|| medvlm::cli::run(cli));
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            // The error as one line; with RUST_BACKTRACE set, the details (a library's
            // backtrace, medvlm's own with "full") follow on lines of their own.
            let detail =
                medvlm::cli::ErrorDetail::from_env(std::env::var_os("RUST_BACKTRACE").as_deref());
            eprintln!("{}", medvlm::cli::error_report(&e, detail));
            ExitCode::FAILURE
        }
        // The hook has printed the one line.
        Err(_) => ExitCode::from(101),
    }
}

//! Every flag of every command, and so every config key (each key is also a flag, with the
//! example config's comment as its help), says what it does.

use clap::CommandFactory;

fn missing_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if matches!(id, "help" | "version") || arg.is_hide_set() {
            continue;
        }
        let has = arg
            .get_help()
            .or(arg.get_long_help())
            .is_some_and(|h| !h.to_string().trim().is_empty());
        if !has {
            out.push(format!("{path} --{}", arg.get_long().unwrap_or(id)));
        }
    }
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        missing_help(sub, &format!("{path} {}", sub.get_name()), out);
    }
}

#[test]
fn every_flag_and_config_key_has_help() {
    let cmd = medvlm::cli::Cli::command();
    let mut out = Vec::new();
    missing_help(&cmd, "medvlm", &mut out);
    assert!(out.is_empty(), "flags without help:\n{}", out.join("\n"));
}

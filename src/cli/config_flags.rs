//! One command-line flag per config key, generated from the commented example config, so a
//! new config field is a flag (with its comment as help) without touching the CLI.
//!
//! Values are read as TOML (`--learning-rate 1e-5`, `--freeze-vision true`); anything that
//! is not a TOML value is taken as a string (`--model ./Qwen2-VL-2B-Instruct`). List keys
//! take one value, comma-separated values or a TOML array (`--modalities MRI`, `--rewards
//! accuracy,format`, `--modalities '["MRI", "CT"]'`). They are merged over the config file
//! and checked by the same deserializer, so a wrong type is reported the same way from both
//! places, named as the user wrote it.

use std::marker::PhantomData;

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};

pub use crate::train::config::parse_example_keys;

/// A config type whose example file lists its keys.
pub trait ConfigKind {
    /// The method's name: "grpo" or "sft".
    const NAME: &'static str;
    /// The commented example config (one `key = value  # help` line per key, optional keys
    /// commented out as `# key = value  # help`).
    fn example() -> &'static str;
    /// Keys (in order) with their help text, parsed once from the example.
    fn keys() -> &'static [(String, String)];
    /// The keys whose value is a list.
    fn list_keys() -> Vec<String>;
}

/// Flag values given on the command line, as a TOML table to merge over the config file.
#[derive(Debug, Clone)]
pub struct ConfigOverrides<K> {
    pub table: toml::Table,
    _kind: PhantomData<K>,
}

fn flag_name(key: &str) -> String {
    key.replace(['_', '.'], "-")
}

/// A flag's text as a TOML value: numbers, booleans, arrays and quoted strings as TOML,
/// anything else as a plain string.
pub fn toml_value(text: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(text.into())),
        Err(_) => toml::Value::String(text.to_string()),
    }
}

impl<K: ConfigKind> FromArgMatches for ConfigOverrides<K> {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut table = toml::Table::new();
        for (key, _) in K::keys() {
            if let Some(v) = m.get_one::<String>(key) {
                table.insert(key.clone(), toml_value(v));
            }
        }
        Ok(Self {
            table,
            _kind: PhantomData,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl<K: ConfigKind> Args for ConfigOverrides<K> {
    fn augment_args(mut cmd: Command) -> Command {
        cmd = cmd.next_help_heading("Config keys (each overrides the config file)");
        let lists = K::list_keys();
        for (key, help) in K::keys() {
            let (value_name, help) = if lists.contains(key) {
                (
                    "LIST",
                    format!("{help} [a list: one value, comma-separated values, or a TOML array]"),
                )
            } else {
                ("VALUE", help.clone())
            };
            cmd = cmd.arg(
                Arg::new(key.clone())
                    .long(flag_name(key))
                    .value_name(value_name)
                    .action(ArgAction::Set)
                    // `--learning-rate -1e-5` reaches the range check (and names the flag)
                    // instead of being taken for a flag `-1`.
                    .allow_hyphen_values(true)
                    .help(help),
            );
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_lines_become_keys_with_help() {
        let keys = parse_example_keys(
            "# Where to start.\nmodel = \"x\"\nlr = 1e-6   # learning rate\n# image_root = \"d\"  # images\n",
        );
        assert_eq!(
            keys,
            vec![
                ("model".to_string(), "Where to start.".to_string()),
                ("lr".to_string(), "learning rate".to_string()),
                ("image_root".to_string(), "images".to_string()),
            ]
        );
    }

    #[test]
    fn section_keys_are_prefixed() {
        let keys = parse_example_keys("top = 1\n\n[lora]\nr = 0  # rank\n");
        assert_eq!(
            keys,
            vec![
                ("top".to_string(), String::new()),
                ("lora.r".to_string(), "rank".to_string())
            ]
        );
        assert_eq!(flag_name("lora.target_modules"), "lora-target-modules");
    }

    #[test]
    fn values_are_typed_as_toml() {
        assert_eq!(toml_value("1e-5"), toml::Value::Float(1e-5));
        assert_eq!(toml_value("8"), toml::Value::Integer(8));
        assert_eq!(toml_value("true"), toml::Value::Boolean(true));
        assert_eq!(toml_value("./ckpt"), toml::Value::String("./ckpt".into()));
        assert_eq!(toml_value("grpo"), toml::Value::String("grpo".into()));
        assert!(matches!(toml_value("[\"MRI\"]"), toml::Value::Array(_)));
    }
}

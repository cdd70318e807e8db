//! `medvlm selftest`: the report table of [`crate::selftest`].

use super::*;

pub(super) fn run_selftest(a: SelftestArgs) -> Result<()> {
    let device = parse_device(a.device.as_deref())?;
    let opts = crate::selftest::Options {
        fixtures: a.fixtures,
        device: device.clone(),
        bench: !a.no_bench,
    };
    if !a.json {
        println!("selftest on {}\n", crate::device::name(&device));
        println!("| check | measured | bound | result |\n| --- | --- | --- | --- |");
    }
    let checks = crate::selftest::run(&opts, |c| {
        if !a.json {
            println!(
                "| {} | {} | {} | {} |",
                c.name,
                c.measured,
                if c.bound.is_empty() { "-" } else { &c.bound },
                if c.pass { "ok" } else { "FAIL" }
            );
        }
    })?;
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.pass)
        .map(|c| c.name.as_str())
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} checks failed: {}",
            failed.len(),
            checks.len(),
            failed.join("; ")
        );
    }
    if !a.json {
        println!("\nall {} checks passed", checks.len());
    }
    Ok(())
}

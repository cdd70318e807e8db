//! `medvlm plot`: parsing `metrics.jsonl` forgivingly and drawing a readable PNG from it.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use medvlm::plot::{plot_run, read_metrics, PlotOptions, SERIES_COLOURS};

/// A GRPO run of `steps` steps as a training loop writes it: every metric on every line, except
/// that `kl` is missing on step 5 and `reward_format_mean` on step 10, `eval_accuracy` appears
/// every 10 steps, one key is unknown to the plotter, and the last line was cut off mid-write.
fn grpo_metrics(steps: usize) -> String {
    let mut text = String::new();
    for step in 1..=steps {
        let t = step as f64 / steps as f64;
        let mut line = format!(
            r#"{{"step": {step}, "epoch": {epoch:.3}, "loss": {loss}, "reward_mean": {rm}, "reward_std": 0.3, "#,
            epoch = t * 2.0,
            loss = 0.01 * (step as f64).sin(),
            rm = 0.5 + 1.2 * t,
        );
        if step != 10 {
            write!(
                line,
                r#""reward_format_mean": {}, "reward_format_std": 0.4, "#,
                0.4 + 0.55 * t
            )
            .unwrap();
        }
        write!(
            line,
            r#""reward_accuracy_mean": {}, "reward_accuracy_std": 0.5, "#,
            0.1 + 0.6 * t
        )
        .unwrap();
        if step != 5 {
            write!(line, r#""kl": {}, "#, 0.004 * t * t).unwrap();
        }
        write!(
            line,
            r#""completion_length_mean": {}, "completion_length_max": {}, "clipped_ratio": 0.0, "lr": {}, "grad_norm": {}, "step_time_s": 12.3, "tokens_per_s": 45.1, "some_future_metric": "text", "frac_reward_zero_std": 0.25"#,
            80.0 + 40.0 * t,
            140.0 + 60.0 * t,
            1e-6 * (1.0 - t),
            0.8 + 0.1 * (step as f64).cos(),
        )
        .unwrap();
        if step % 10 == 0 {
            write!(line, r#", "eval_accuracy": {}"#, 0.4 + 0.3 * t).unwrap();
        }
        line.push_str("}\n");
        text.push_str(&line);
    }
    text.push_str(r#"{"step": 41, "epoch": 2.05, "loss": 0.0"#);
    text
}

fn write_run(dir: &Path, text: &str) {
    fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

#[test]
fn read_metrics_collects_series_and_counts_skipped_lines() {
    let text = "{\"step\": 1, \"loss\": 2.0, \"lr\": 1e-5, \"name\": \"x\", \"flag\": true}\n\
                \n\
                not json at all\n\
                {\"step\": 2, \"loss\": 1.5, \"eval_accuracy\": 0.25, \"grad_norm\": null}\n\
                [1, 2, 3]\n\
                {\"step\": 3, \"loss\": 1.25, \"lr\": 9e-6}\n\
                {\"loss\": 1.0}\n\
                {\"step\": 2, \"loss\": 1.4}\n\
                {\"step\": 6, \"loss\": NaN, \"lr\": 8e-6}\n\
                {\"step\": 7, \"loss\": 0.9";
    let m = read_metrics(text);
    // Line numbers count the blank line; the last line is cut off.
    assert_eq!(m.skipped_lines, vec![3, 5, 10]);
    assert_eq!(m.skipped(), 3);
    assert_eq!(m.records, 6);
    // Strings, booleans and nulls are not series; `step` is the x axis, not a series.
    let keys: Vec<&str> = m.series.keys().map(String::as_str).collect();
    assert_eq!(keys, ["eval_accuracy", "loss", "lr"]);
    // A line without a step follows the previous one; a repeated step (a resumed run) keeps
    // the later value; Python's bare NaN drops only that value, not the line.
    assert_eq!(
        m.get("loss").unwrap(),
        [(1.0, 2.0), (2.0, 1.4), (3.0, 1.25), (4.0, 1.0)]
    );
    assert_eq!(
        m.get("lr").unwrap(),
        [(1.0, 1e-5), (3.0, 9e-6), (6.0, 8e-6)]
    );
    assert_eq!(m.get("eval_accuracy").unwrap(), [(2.0, 0.25)]);
    assert!(m.get("grad_norm").is_none());
}

#[test]
fn read_metrics_of_grpo_run_keeps_gaps() {
    let m = read_metrics(&grpo_metrics(40));
    assert_eq!(m.records, 40);
    assert_eq!(m.skipped_lines, vec![41]);
    assert_eq!(m.get("reward_mean").unwrap().len(), 40);
    let kl = m.get("kl").unwrap();
    assert_eq!(kl.len(), 39);
    assert!(kl.iter().all(|&(s, _)| s != 5.0));
    assert_eq!(m.get("reward_format_mean").unwrap().len(), 39);
    let eval: Vec<f64> = m
        .get("eval_accuracy")
        .unwrap()
        .iter()
        .map(|p| p.0)
        .collect();
    assert_eq!(eval, [10.0, 20.0, 30.0, 40.0]);
}

/// Every distinct colour of the image, and how often each occurs.
fn colour_counts(img: &image::RgbImage) -> std::collections::HashMap<[u8; 3], usize> {
    let mut counts = std::collections::HashMap::new();
    for p in img.pixels() {
        *counts.entry(p.0).or_insert(0) += 1;
    }
    counts
}

#[test]
fn plot_run_writes_a_readable_png() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("grpo-run");
    fs::create_dir(&run).unwrap();
    write_run(&run, &grpo_metrics(40));

    let written = plot_run(&run, &PlotOptions::default()).unwrap();
    assert_eq!(written, run.join("curves.png"));
    let img = image::open(&written).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1600, 1000));

    let counts = colour_counts(&img);
    // Antialiased text and several curves: far more than a handful of colours.
    assert!(counts.len() > 50, "only {} colours", counts.len());
    // The first curve colour of each panel, the second and third of the reward panel.
    for colour in &SERIES_COLOURS[..3] {
        let n = counts.get(colour).copied().unwrap_or(0);
        assert!(n > 500, "curve colour {colour:?} drawn on only {n} pixels");
    }
    // Mostly background, but not blank.
    let white = counts.get(&[255, 255, 255]).copied().unwrap_or(0);
    let total = 1600 * 1000;
    assert!(
        white > total / 2 && white < total * 99 / 100,
        "{white} white pixels"
    );
    // Dark pixels: text and axes.
    let dark: usize = counts
        .iter()
        .filter(|(c, _)| c.iter().all(|&v| v < 60))
        .map(|(_, n)| n)
        .sum();
    assert!(dark > 5000, "only {dark} dark pixels: is the text drawn?");
    // No temporary file left beside the PNG.
    let names: HashSet<String> = fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        HashSet::from(["metrics.jsonl".into(), "curves.png".into()])
    );
}

#[test]
fn plot_run_honours_out_and_size_and_plots_sft_runs() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("sft");
    fs::create_dir(&run).unwrap();
    let text: String = (0..25)
        .map(|s| {
            format!(
                "{{\"step\": {s}, \"loss\": {}, \"lr\": 2e-5, \"grad_norm\": 1.5, \"tokens_per_s\": 900}}\n",
                3.0 / (1.0 + s as f64)
            )
        })
        .collect();
    write_run(&run, &text);
    let out = dir.path().join("elsewhere.png");
    let opts = PlotOptions {
        out: Some(out.clone()),
        width: 800,
        height: 500,
    };
    assert_eq!(plot_run(&run, &opts).unwrap(), out);
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (800, 500));
    let counts = colour_counts(&img);
    let blue = counts.get(&SERIES_COLOURS[0]).copied().unwrap_or(0);
    assert!(blue > 200, "curve colour on only {blue} pixels");
    // Overwriting an existing plot works (the rename replaces it).
    plot_run(&run, &opts).unwrap();
}

#[test]
fn plot_run_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let opts = PlotOptions::default();

    let missing_dir = dir.path().join("nope");
    let err = format!("{:#}", plot_run(&missing_dir, &opts).unwrap_err());
    assert!(
        err.contains("nope") && err.contains("no such run directory"),
        "{err}"
    );

    let err = format!("{:#}", plot_run(dir.path(), &opts).unwrap_err());
    assert!(
        err.contains("metrics.jsonl") && err.contains("not found"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");

    write_run(dir.path(), "\n\n");
    let err = format!("{:#}", plot_run(dir.path(), &opts).unwrap_err());
    assert!(
        err.contains("metrics.jsonl") && err.contains("empty"),
        "{err}"
    );

    write_run(dir.path(), "{\"step\": 1, \"note\": \"hi\"}\n{\"step\": 2");
    let err = format!("{:#}", plot_run(dir.path(), &opts).unwrap_err());
    assert!(
        err.contains("metrics.jsonl") && err.contains("no numeric metrics"),
        "{err}"
    );

    write_run(dir.path(), "{\"step\": 1, \"epoch\": 0.1}\n");
    let err = format!("{:#}", plot_run(dir.path(), &opts).unwrap_err());
    assert!(
        err.contains("metrics.jsonl") && err.contains("epoch"),
        "{err}"
    );

    // Nothing was written on any of these failures.
    assert!(!dir.path().join("curves.png").exists());
}

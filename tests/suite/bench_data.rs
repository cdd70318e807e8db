//! The benchmark loaders (`data::bench`) on the fixtures `tools/make_bench_fixtures.py`
//! writes in each benchmark's downloaded layout: counts equal those the script computed,
//! formats are detected from folders and files, and hostile input is one line of error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use medvlm::data::bench::{
    detect, load, Answer, BenchSet, Format, ImageRef, Language, LoadOptions,
};
use serde_json::Value;

fn bench_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bench")
}

fn expected() -> Value {
    let text =
        std::fs::read_to_string(bench_fixtures().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json is JSON")
}

fn load_all(path: &Path) -> BenchSet {
    load(path, &LoadOptions::default()).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
}

/// The set's counts in expected.json's shape.
fn counts(set: &BenchSet) -> Value {
    let mut split = BTreeMap::<String, usize>::new();
    let mut modality = BTreeMap::<String, usize>::new();
    let mut kind = BTreeMap::<String, usize>::new();
    let mut language = BTreeMap::<String, usize>::new();
    let mut skipped = BTreeMap::<String, usize>::new();
    let mut images = 0;
    for it in &set.items {
        *split.entry(it.split.clone()).or_default() += 1;
        let m = it
            .modality
            .as_ref()
            .map_or("none", |m| m.name())
            .to_string();
        *modality.entry(m).or_default() += 1;
        *kind.entry(it.answer.kind().to_string()).or_default() += 1;
        *language.entry(it.language.code().to_string()).or_default() += 1;
        images += it.images.len();
    }
    for s in &set.skipped {
        *skipped.entry(s.kind.to_string()).or_default() += 1;
    }
    serde_json::json!({
        "items": set.items.len(),
        "split": split,
        "modality": modality,
        "kind": kind,
        "language": language,
        "images": images,
        "skipped": skipped,
    })
}

const FOLDERS: [(&str, Format); 7] = [
    ("vqa-rad", Format::VqaRad),
    ("path-vqa", Format::PathVqa),
    ("slake", Format::Slake),
    ("pmc-vqa", Format::PmcVqa),
    ("omnimedvqa", Format::OmniMedVqa),
    ("mmmu", Format::Mmmu),
    ("medxpertqa", Format::MedXpertQa),
];

#[test]
fn every_fixture_loads_with_the_expected_counts() {
    let expected = expected();
    for (name, format) in FOLDERS {
        let dir = bench_fixtures().join(name);
        let set = load_all(&dir);
        assert_eq!(set.format, format, "{name}");
        assert_eq!(counts(&set), expected[name], "{name}");
        for s in &set.skipped {
            let line = s.to_string();
            assert!(
                !line.contains('\n') && line.contains(&format!("row {}", s.row)),
                "{line}"
            );
        }
        // Told the format, the same.
        let told = load(
            &dir,
            &LoadOptions {
                format: Some(format),
                splits: vec![],
            },
        )
        .expect("told");
        assert_eq!(counts(&told), expected[name], "{name} told");
    }
}

#[test]
fn formats_are_detected_from_folders_and_files() {
    let f = bench_fixtures();
    for (name, format) in FOLDERS {
        assert_eq!(detect(&f.join(name)).expect(name), format, "{name}");
    }
    for (file, format) in [
        (
            "vqa-rad/data/test-00000-of-00001-te0f00d.parquet",
            Format::VqaRad,
        ),
        (
            "path-vqa/data/test-00001-of-00002-te1f00d.parquet",
            Format::PathVqa,
        ),
        ("slake/test.json", Format::Slake),
        ("pmc-vqa/test_clean.csv", Format::PmcVqa),
        ("pmc-vqa/test_2.csv", Format::PmcVqa),
        (
            "omnimedvqa/OmniMedVQA/QA_information/Open-access/Chest CT Scan.json",
            Format::OmniMedVqa,
        ),
        (
            "mmmu/Pharmacy/validation-00000-of-00001.parquet",
            Format::Mmmu,
        ),
        ("medxpertqa/MM/test.jsonl", Format::MedXpertQa),
        ("omnimedvqa/OmniMedVQA", Format::OmniMedVqa),
        ("medxpertqa/MM", Format::MedXpertQa),
        ("mmmu/Clinical_Medicine", Format::Mmmu),
    ] {
        assert_eq!(detect(&f.join(file)).expect(file), format, "{file}");
    }
    for name in Format::ALL.map(Format::name) {
        assert_eq!(name.parse::<Format>().expect(name).name(), name);
    }
    assert_eq!(
        "PathVQA".parse::<Format>().expect("spelling"),
        Format::PathVqa
    );
    let err = "vqa".parse::<Format>().expect_err("unknown");
    assert!(
        err.to_string().contains("known: vqa-rad, path-vqa"),
        "{err}"
    );
}

#[test]
fn a_single_file_loads_its_own_rows() {
    let f = bench_fixtures();
    let set = load_all(&f.join("slake/test.json"));
    assert_eq!(set.splits(), ["test"]);
    assert_eq!(set.items.len(), 5);
    let set = load_all(&f.join("pmc-vqa/test_2.csv"));
    assert_eq!((set.items.len(), set.skipped.len()), (2, 1));
    let set =
        load_all(&f.join("omnimedvqa/OmniMedVQA/QA_information/Open-access/Fundus Demo.json"));
    assert_eq!((set.items.len(), set.skipped.len()), (1, 1));
    let set = load_all(&f.join("medxpertqa/MM/dev.jsonl"));
    assert_eq!(set.items[0].id, "MM-9");
    let set = load_all(&f.join("path-vqa/data/test-00001-of-00002-te1f00d.parquet"));
    assert_eq!((set.items.len(), set.skipped.len()), (1, 1));
}

#[test]
fn rows_keep_what_each_benchmark_says() {
    let f = bench_fixtures();
    // MMMU: several images in column order, placeholders kept, quoted options, open and
    // text-only rows; the non-medical subject left out.
    let mmmu = load_all(&f.join("mmmu"));
    let by_id = |id: &str| {
        mmmu.items
            .iter()
            .find(|i| i.id == id)
            .unwrap_or_else(|| panic!("{id}"))
    };
    let two = by_id("validation_Clinical_Medicine_1");
    assert!(two.question.contains("<image 1> and <image 2>"));
    assert_eq!(two.images.len(), 2);
    assert!(
        matches!(&two.images[0], ImageRef::Bytes { bytes, name } if bytes.starts_with(b"\x89PNG") && name.as_deref() == Some("img1.png"))
    );
    assert_eq!(two.extra["subject"], "Clinical_Medicine");
    let quoted = by_id("validation_Clinical_Medicine_2");
    assert_eq!(
        quoted.answer,
        Answer::Choice {
            options: vec![
                "Murphy's sign".into(),
                "The \"halo\" sign".into(),
                "a\\b".into(),
                "None".into()
            ],
            answer: 0
        }
    );
    assert_eq!(
        by_id("validation_Clinical_Medicine_3").answer,
        Answer::Open { answer: "3".into() }
    );
    assert!(by_id("validation_Clinical_Medicine_4").images.is_empty());
    assert_eq!(by_id("validation_Pharmacy_1").images.len(), 7);
    assert!(mmmu.items.iter().all(|i| !i.id.contains("Art")));
    let bad = mmmu
        .skipped
        .iter()
        .find(|s| s.kind == "bad options")
        .expect("bad options");
    assert!(
        bad.reason.contains("not a Python list of strings"),
        "{}",
        bad.reason
    );

    // SLAKE: answer_type, q_lang, modality; the language filter.
    let mut slake = load_all(&f.join("slake"));
    let zh = slake
        .items
        .iter()
        .find(|i| i.question == "图中有肝脏吗?")
        .expect("zh closed");
    assert_eq!(
        (zh.language, &zh.answer),
        (
            Language::Zh,
            &Answer::Closed {
                answer: "是的".into()
            }
        )
    );
    assert_eq!(zh.modality_raw.as_deref(), Some("MRI"));
    assert_eq!(zh.extra["content_type"], "Organ");
    assert_eq!(slake.retain_language(Language::En), 3);
    assert!(slake.items.iter().all(|i| i.language == Language::En));

    // PMC-VQA: prefixes removed; v1's Answer_label; v2's figures/.
    let pmc = load_all(&f.join("pmc-vqa"));
    let sign = pmc
        .items
        .iter()
        .find(|i| i.question.contains("\"sign\""))
        .expect("quoted question");
    assert_eq!(
        sign.answer,
        Answer::Choice {
            options: vec![
                "Air bronchogram".into(),
                "Halo".into(),
                "Tree-in-bud".into(),
                "None".into()
            ],
            answer: 0
        }
    );
    assert!(pmc
        .items
        .iter()
        .any(|i| i.question == "Which imaging\nmodality was used?"));
    let v2 = pmc.items.iter().find(|i| i.split == "test_2").expect("v2");
    assert!(matches!(&v2.images[0], ImageRef::Path(p) if p.ends_with("figures/PMC8_F1.jpg")));
    assert_eq!(v2.extra["caption"], "A chest film.");

    // OmniMedVQA: 2-4 options, gt_answer text to index, the `modality` key quirk.
    let omni = load_all(&f.join("omnimedvqa"));
    let n_options: Vec<usize> = omni
        .items
        .iter()
        .map(|i| match &i.answer {
            Answer::Choice { options, .. } => options.len(),
            _ => 0,
        })
        .collect();
    assert_eq!(n_options, [4, 2, 3, 3]);
    let quirk = omni
        .items
        .iter()
        .find(|i| i.question == "Which organ is shown?")
        .expect("quirk");
    assert_eq!(
        quirk.modality_raw.as_deref(),
        Some("CT(Computed Tomography)")
    );
    assert_eq!(quirk.extra["question_type"], "Anatomy Identification");

    // MedXpertQA: options A-E, the repeated choices cut from the question.
    let mx = load_all(&f.join("medxpertqa"));
    let mm2 = mx.items.iter().find(|i| i.id == "MM-2").expect("MM-2");
    assert_eq!(mm2.images.len(), 3);
    assert!(!mm2.question.contains("Answer Choices"));
    assert!(matches!(&mm2.answer, Answer::Choice { options, answer: 3 } if options.len() == 5));

    // VQA-RAD: closed by the yes/no rule on the raw answer.
    let rad = load_all(&f.join("vqa-rad"));
    assert!(rad.items.iter().any(|i| i.answer
        == Answer::Closed {
            answer: " No ".into()
        }));
}

#[test]
fn splits_are_chosen_by_name() {
    let f = bench_fixtures();
    let opts = |s: &[&str]| LoadOptions {
        format: None,
        splits: s.iter().map(|s| s.to_string()).collect(),
    };
    let set = load(&f.join("path-vqa"), &opts(&["test"])).expect("test");
    assert_eq!((set.items.len(), set.splits()), (3, vec!["test"]));
    let set = load(&f.join("mmmu"), &opts(&["validation", "dev"])).expect("val+dev");
    assert_eq!(set.items.len(), 7);
    let err = load(&f.join("slake"), &opts(&["dev"])).expect_err("no dev");
    assert_eq!(
        format!("{err:#}"),
        format!(
            "{}: no split dev (its splits: train, validation, test)",
            f.join("slake").display()
        )
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).expect("copy");
        }
    }
}

#[test]
fn unknown_folders_and_ambiguous_parquet_are_one_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let empty = tmp.path().join("nothing");
    std::fs::create_dir(&empty).expect("mkdir");
    std::fs::write(empty.join("notes.txt"), "hello").expect("write");
    let err = format!("{:#}", detect(&empty).expect_err("nothing"));
    assert!(!err.contains('\n'), "{err}");
    assert!(
        err.starts_with(&format!("{}: not a medical VQA benchmark", empty.display())),
        "{err}"
    );
    for looked in [
        "data/*.parquet",
        "test.json",
        "Figure_path",
        "QA_information",
        "MM/test.jsonl",
    ] {
        assert!(err.contains(looked), "{err}");
    }
    let err = format!(
        "{:#}",
        load(&empty, &LoadOptions::default()).expect_err("nothing")
    );
    assert!(err.contains("not a medical VQA benchmark"), "{err}");
    // Told a format the folder does not hold.
    let err = format!(
        "{:#}",
        load(
            &empty,
            &LoadOptions {
                format: Some(Format::Slake),
                splits: vec![]
            }
        )
        .expect_err("no slake")
    );
    assert!(err.contains("no SLAKE files found"), "{err}");
    let err = format!(
        "{:#}",
        detect(&tmp.path().join("absent")).expect_err("absent")
    );
    assert!(err.ends_with("absent: no such file or folder"), "{err}");

    // VQA-RAD and PathVQA share a schema: a neutral name tells them apart by PathVQA's
    // validation split, or not at all.
    let p = tmp.path().join("x1");
    copy_dir(&bench_fixtures().join("path-vqa"), &p);
    assert_eq!(detect(&p).expect("validation split"), Format::PathVqa);
    let r = tmp.path().join("x2");
    copy_dir(&bench_fixtures().join("vqa-rad"), &r);
    let err = format!("{:#}", detect(&r).expect_err("ambiguous"));
    assert!(
        err.contains("--format vqa-rad or --format path-vqa") && !err.contains('\n'),
        "{err}"
    );
    let told = load(
        &r,
        &LoadOptions {
            format: Some(Format::VqaRad),
            splits: vec![],
        },
    )
    .expect("told");
    assert_eq!(counts(&told), expected()["vqa-rad"]);

    // Images still zipped.
    let s = tmp.path().join("slake");
    std::fs::create_dir(&s).expect("mkdir");
    std::fs::copy(
        bench_fixtures().join("slake/test.json"),
        s.join("test.json"),
    )
    .expect("copy");
    std::fs::write(s.join("imgs.zip"), b"PK").expect("zip");
    let err = format!(
        "{:#}",
        load(&s, &LoadOptions::default()).expect_err("zipped")
    );
    assert!(err.contains("still in imgs.zip"), "{err}");
}

/// One line naming the file, no panic.
fn one_line_error(path: &Path, format: Option<Format>) -> String {
    let r = std::panic::catch_unwind(|| {
        load(
            path,
            &LoadOptions {
                format,
                splits: vec![],
            },
        )
    });
    let err = r
        .unwrap_or_else(|_| panic!("{}: panicked", path.display()))
        .expect_err("hostile input loads");
    let msg = format!("{err:#}");
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    msg
}

#[test]
fn hostile_files_are_one_line_errors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let f = bench_fixtures();
    // Not parquet at all.
    let d = tmp.path().join("vqa-rad/data");
    std::fs::create_dir_all(&d).expect("mkdir");
    let fake = d.join("test-00000-of-00001-x.parquet");
    std::fs::write(&fake, b"image,question,answer\nnot,parquet,at all\n").expect("write");
    let msg = one_line_error(&fake, Some(Format::VqaRad));
    assert!(msg.contains("not a readable parquet file"), "{msg}");
    let msg = format!("{:#}", detect(&fake).expect_err("detect"));
    assert!(
        msg.contains("not a readable parquet file") && !msg.contains('\n'),
        "{msg}"
    );
    // Truncated: the tail (footer) gone, or the middle cut out.
    let real =
        std::fs::read(f.join("vqa-rad/data/train-00000-of-00001-tr0f00d.parquet")).expect("read");
    for (name, bytes) in [
        ("head.parquet", real[..real.len() / 2].to_vec()),
        (
            "hole.parquet",
            [&real[..4], &real[real.len() / 2..]].concat(),
        ),
        ("zeros.parquet", {
            let mut b = real.clone();
            let n = b.len();
            b[8..n - 200].fill(0);
            b
        }),
    ] {
        let p = d.join(name);
        std::fs::write(&p, bytes).expect("write");
        one_line_error(&p, Some(Format::VqaRad));
    }
    // An MMMU file read as VQA-RAD: the missing columns are named.
    let msg = one_line_error(
        &f.join("mmmu/Pharmacy/validation-00000-of-00001.parquet"),
        Some(Format::VqaRad),
    );
    assert!(msg.contains("has no column image"), "{msg}");
    // A directory where a parquet file belongs, a device.
    let msg = one_line_error(Path::new("/dev/null"), Some(Format::Mmmu));
    assert!(msg.contains("character device"), "{msg}");

    // JSON of the wrong shape: the file is an error; a row of wrong types is skipped.
    let s = tmp.path().join("slake");
    std::fs::create_dir_all(s.join("imgs")).expect("mkdir");
    let test = s.join("test.json");
    std::fs::write(&test, r#"{"question": "not a list"}"#).expect("write");
    let msg = one_line_error(&test, Some(Format::Slake));
    assert!(
        msg.contains("not a JSON list of rows (the file holds a JSON object)"),
        "{msg}"
    );
    std::fs::write(&test, "[{\"img_name\": 3").expect("write");
    let msg = one_line_error(&test, Some(Format::Slake));
    assert!(msg.contains("not valid JSON"), "{msg}");
    std::fs::write(
        &test,
        r#"[1, {"img_name": ["a"], "question": "q", "answer": "a", "answer_type": "OPEN", "q_lang": "en"}]"#,
    )
    .expect("write");
    let set = load(&test, &LoadOptions::default()).expect("rows skipped");
    let reasons: Vec<&str> = set.skipped.iter().map(|s| s.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            "the row is a JSON number, not an object",
            "img_name is a JSON list, not a string"
        ]
    );
    // MedXpertQA lines that are not JSON, or hold the wrong types.
    let m = tmp.path().join("mx");
    std::fs::create_dir_all(m.join("MM")).expect("mkdir");
    std::fs::create_dir_all(m.join("images")).expect("mkdir");
    std::fs::write(
        m.join("MM/test.jsonl"),
        "{not json\n{\"id\": \"x\", \"question\": \"q\", \"label\": \"A\", \"options\": [\"a\"]}\n",
    )
    .expect("write");
    let set = load(&m, &LoadOptions::default()).expect("rows skipped");
    assert_eq!(set.skipped.len(), 2);
    assert!(set.skipped.iter().all(|s| s.kind == "malformed row"));
    // A CSV with an unclosed quote.
    let p = tmp.path().join("pmc");
    std::fs::create_dir_all(p.join("images")).expect("mkdir");
    let csv = p.join("test_clean.csv");
    std::fs::write(
        &csv,
        "Figure_path,Question,Choice A,Choice B,Choice C,Choice D,Answer_label\n\"a.jpg,q",
    )
    .expect("write");
    let msg = one_line_error(&csv, None);
    assert!(msg.contains("not valid CSV"), "{msg}");
}

// ---------------------------------------------------------------------------------------------
// Benchmarks through `medvlm eval`.

/// `eval --data <benchmark folder>` reads each benchmark as downloaded and reports it: the
/// items and skipped rows per kind the fixture script counted (tools/make_bench_fixtures.py,
/// not our loader), each kind scored by its protocols (named in report.json and report.md),
/// every item's `correct` the verdict of its kind's first protocol.
#[test]
fn eval_reads_every_benchmark_and_names_its_protocols() {
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(crate::common::fixtures().join("bench/expected.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let model = crate::common::fixtures().join("tiny-a");
    for (name, want) in expected.as_object().unwrap() {
        let out = tmp.path().join(name);
        let data = crate::common::fixtures().join("bench").join(name);
        let (ok, _, err) = crate::common::medvlm(&[
            "eval",
            "--model",
            crate::common::s(&model),
            "--data",
            crate::common::s(&data),
            "--out",
            crate::common::s(&out),
            "--max-new-tokens",
            "4",
        ]);
        assert!(ok, "{name}: {err}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap())
                .unwrap();
        let all = report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["modality"] == "all")
            .unwrap();
        assert_eq!(all["n"], want["items"], "{name}: items");
        let skipped: u64 = want["skipped"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(all["skipped"].as_u64().unwrap(), skipped, "{name}: skipped");
        assert_eq!(report["settings"]["format"], name.as_str(), "{name}");
        assert_eq!(report["scoring"]["closed"], "closed", "{name}");
        let items: Vec<serde_json::Value> = std::fs::read_to_string(out.join("items.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
        for it in &items {
            let kind = it["kind"].as_str().unwrap();
            *kinds.entry(kind.to_string()).or_default() += 1;
            let scores = it["scores"].as_object().unwrap();
            let (names, primary): (Vec<&str>, &str) = match kind {
                "choice" => (vec!["mc-letter"], "mc-letter"),
                "closed" => (vec!["closed"], "closed"),
                _ => (
                    vec!["open-exact", "open-f1", "open-recall-llavamed"],
                    "open-exact",
                ),
            };
            let mut got: Vec<&str> = scores.keys().map(String::as_str).collect();
            got.sort_unstable();
            assert_eq!(got, names, "{name}: {it}");
            assert_eq!(
                it["correct"].as_bool().unwrap(),
                scores[primary].as_f64().unwrap() >= 1.0,
                "{name}: {it}"
            );
            assert!(it["answer"].as_str().is_some_and(|a| !a.is_empty()), "{it}");
        }
        let want_kinds: std::collections::BTreeMap<String, u64> = want["kind"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
            .collect();
        assert_eq!(kinds, want_kinds, "{name}: kinds");
        let md = std::fs::read_to_string(out.join("report.md")).unwrap();
        assert!(
            md.contains("Scoring: multiple choice mc-letter; closed closed"),
            "{md}"
        );
        if want_kinds.len() > 1 {
            assert!(md.contains("| kind | n |"), "{name}: {md}");
        }
    }
}

/// Wrong flags for the data are one line naming them.
#[test]
fn eval_refuses_flags_that_do_not_fit_the_data() {
    let model = crate::common::fixtures().join("tiny-a");
    let m = crate::common::s(&model);
    let slake = crate::common::fixtures().join("bench/slake");
    let s = crate::common::s(&slake);
    for (args, says) in [
        (vec!["--format", "pathvqa2"], "unknown benchmark format"),
        (vec!["--language", "fr"], "unknown language"),
        (
            vec!["--closed-protocol", "open-f1"],
            "not a closed-question protocol",
        ),
        (
            vec!["--open-protocol", "closed"],
            "not an open-question protocol",
        ),
        (vec!["--open-protocol", "bleu"], "unknown scoring protocol"),
        (vec!["--split", "train2"], "train2"),
        (
            vec!["--image-root", "/tmp"],
            "--image-root applies to MedVLM-R1 data",
        ),
    ] {
        let mut all = vec!["eval", "--model", m, "--data", s];
        all.extend(args.iter().copied());
        let (ok, _, err) = crate::common::medvlm(&all);
        assert!(!ok, "{args:?}");
        // The first line says it (clap adds a hint line after its own).
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error:") && first.contains(says),
            "{args:?}: {err}"
        );
    }
}

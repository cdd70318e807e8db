//! Every scoring protocol of `medvlm::data::score` against the ORIGINAL Python rules of the
//! harnesses, on the cases of `tests/fixtures/score/reference.json` (written by
//! `tools/score_reference.py`, which imports MedEvalKit, LLaVA-Med and lmms-eval source files at
//! the commits recorded in the fixture). The expected numbers are Python's, never ours: 0/1
//! outcomes must be equal, fractions within 1e-9.

use medvlm::data::score::{
    closed_corrected, closed_medevalkit, llavamed_f1, llavamed_normalize, llavamed_recall,
    lmms_slake_normalize, medevalkit_open, mmmu_choice_correct, mmmu_eval_open, mmmu_parse_choice,
    mmmu_parse_open, MmmuValue, Protocol,
};
use serde_json::Value;

use crate::common::fixtures;

fn reference() -> Value {
    let path = fixtures().join("score/reference.json");
    let text = std::fs::read_to_string(&path).expect("read the score fixture");
    serde_json::from_str(&text).expect("the score fixture is JSON")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9
}

#[test]
fn score_fixture_records_its_sources() {
    let r = reference();
    let src = &r["sources"];
    assert_eq!(
        src["MedEvalKit"]["commit"],
        "9b12e3b34232a8779cc1275417bf4f72f03d28e0"
    );
    assert_eq!(
        src["LLaVA-Med"]["commit"],
        "b9a98a736d2ef05bcf5ff345be6403fb3a664eaf"
    );
    assert_eq!(
        src["lmms-eval"]["commit"],
        "75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3"
    );
    assert_eq!(
        src["MMMU"]["commit"],
        "bb0b95a945998d91dfef37e969e07d49d1139438"
    );
    let n = r["cases"].as_array().expect("cases").len();
    assert!(n >= 300, "{n} cases");
    let n = r["mc_cases"].as_array().expect("mc_cases").len();
    assert!(n >= 40, "{n} multiple-choice cases");
}

/// A parsed MMMU value as a comparable key: numbers by bits (every NaN alike), texts as is.
fn mmmu_key(v: &MmmuValue) -> String {
    match v {
        MmmuValue::Number(x) if x.is_nan() => "n:nan".into(),
        MmmuValue::Number(x) => format!("n:{:x}", x.to_bits()),
        MmmuValue::Text(t) => format!("t:{t}"),
    }
}

#[test]
fn score_mmmu_multiple_choice_equals_the_python_original() {
    let r = reference();
    let cases = r["mc_cases"].as_array().expect("mc_cases");
    let mut bad: Vec<String> = Vec::new();
    let mut unparsed = 0;
    for c in cases {
        let pred = c["prediction"].as_str().expect("prediction");
        let options: Vec<&str> = c["options"]
            .as_array()
            .expect("options")
            .iter()
            .map(|o| o.as_str().expect("option"))
            .collect();
        let gold = c["gold_index"].as_u64().expect("gold index") as usize;
        let py = &c["mc-mmmu"];
        // null: the original's random fallback, which medvlm counts as no answer.
        let want = py["parsed"]
            .as_str()
            .map(|s| s.chars().next().expect("letter"));
        unparsed += usize::from(want.is_none());
        let ours = mmmu_parse_choice(pred, &options);
        let correct = mmmu_choice_correct(pred, &options, gold);
        if ours != want || correct != py["correct"].as_bool().expect("bool") {
            bad.push(format!(
                "case {} pred {pred:?}: ours {ours:?}/{correct} python {want:?}/{}",
                c["id"], py["correct"]
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(unparsed > 0, "the fixture has random-fallback cases");
}

#[test]
fn score_protocols_equal_the_python_originals() {
    let r = reference();
    let cases = r["cases"].as_array().expect("cases");
    let mut bad: Vec<String> = Vec::new();
    let mut crashes = 0;
    for c in cases {
        let id = &c["id"];
        let pred = c["prediction"].as_str().expect("prediction");
        let gold = c["answer"].as_str().expect("answer");
        let mut check = |what: &str, ours: String, python: String| {
            if ours != python {
                bad.push(format!(
                    "case {id} {what}: pred {pred:?} gold {gold:?}: ours {ours} python {python}"
                ));
            }
        };
        let b = |v: &Value| v.as_bool().expect("bool").to_string();

        check(
            "closed-medevalkit",
            closed_medevalkit(pred, gold).to_string(),
            b(&c["closed-medevalkit"]),
        );
        check(
            "closed",
            closed_corrected(pred, gold).to_string(),
            b(&c["closed"]),
        );
        check(
            "open-recall-llavamed",
            llavamed_recall(pred, gold).to_string(),
            b(&c["open-recall-llavamed"]),
        );
        let ex = &c["open-exact"];
        check(
            "open-exact",
            { lmms_slake_normalize(pred) == lmms_slake_normalize(gold) }.to_string(),
            b(&ex["correct"]),
        );
        check(
            "lmms normalised prediction",
            lmms_slake_normalize(pred),
            ex["prediction_normalized"].as_str().expect("str").into(),
        );
        check(
            "lmms normalised answer",
            lmms_slake_normalize(gold),
            ex["target_normalized"].as_str().expect("str").into(),
        );
        let ln = &c["llavamed_normalized"];
        check(
            "llava-med normalised prediction",
            llavamed_normalize(&pred.to_lowercase()),
            ln["prediction"].as_str().expect("str").into(),
        );
        check(
            "llava-med normalised answer",
            llavamed_normalize(&gold.to_lowercase()),
            ln["answer"].as_str().expect("str").into(),
        );

        let f = llavamed_f1(pred, gold);
        let pf = &c["open-f1"];
        for (name, ours) in [
            ("f1", f.f1),
            ("precision", f.precision),
            ("recall", f.recall),
        ] {
            let py = pf[name].as_f64().expect("number");
            if !close(ours, py) {
                check(&format!("open-f1 {name}"), ours.to_string(), py.to_string());
            }
        }

        let po = &c["open-medevalkit"];
        match (medevalkit_open(pred, gold), po.get("error")) {
            (None, Some(_)) => crashes += 1,
            (Some(m), None) => {
                check("open-medevalkit em", m.em.to_string(), b(&po["em"]));
                let (rp, rr, rf) = m.as_reported();
                let ours = [
                    ("bleu1", m.bleu[0]),
                    ("bleu2", m.bleu[1]),
                    ("bleu3", m.bleu[2]),
                    ("bleu4", m.bleu[3]),
                    // MedEvalKit's names, swapped as it reports them.
                    ("precision", rp),
                    ("recall", rr),
                    ("f1", rf),
                ];
                for (name, v) in ours {
                    let py = po[name].as_f64().expect("number");
                    if !close(v, py) {
                        check(
                            &format!("open-medevalkit {name}"),
                            v.to_string(),
                            py.to_string(),
                        );
                    }
                }
            }
            (ours, py) => check(
                "open-medevalkit crash",
                format!("{ours:?}"),
                format!("{py:?}"),
            ),
        }

        // The Protocol front door agrees with the functions checked above.
        let want = [
            (Protocol::ClosedMedEvalKit, c["closed-medevalkit"].as_bool()),
            (Protocol::Closed, c["closed"].as_bool()),
            (Protocol::OpenExact, ex["correct"].as_bool()),
            (
                Protocol::OpenRecallLlavaMed,
                c["open-recall-llavamed"].as_bool(),
            ),
            (
                Protocol::OpenMedEvalKit,
                Some(po["em"].as_bool().unwrap_or(false)),
            ),
        ];
        for (p, w) in want {
            let w = if w.expect("bool") { 1.0 } else { 0.0 };
            if p.score(pred, gold) != w {
                check(p.name(), p.score(pred, gold).to_string(), w.to_string());
            }
        }
        let pm = &c["open-mmmu"];
        let parsed = mmmu_parse_open(pred);
        let mut ours: Vec<String> = parsed.iter().map(mmmu_key).collect();
        let mut want: Vec<String> = pm["parsed"]
            .as_array()
            .expect("parsed")
            .iter()
            .map(|v| match (v.get("number"), v.get("text")) {
                (Some(n), _) => {
                    let n = n.as_str().expect("repr");
                    let x: f64 = n.parse().expect("a Python float repr");
                    mmmu_key(&MmmuValue::Number(x))
                }
                (_, Some(t)) => mmmu_key(&MmmuValue::Text(t.as_str().expect("str").into())),
                _ => panic!("bad parsed value {v}"),
            })
            .collect();
        ours.sort();
        want.sort();
        check("open-mmmu parsed", format!("{ours:?}"), format!("{want:?}"));
        check(
            "open-mmmu",
            mmmu_eval_open(gold, &parsed).to_string(),
            b(&pm["correct"]),
        );
        let w = if pm["correct"].as_bool().expect("bool") {
            1.0
        } else {
            0.0
        };
        if Protocol::OpenMmmu.score(pred, gold) != w {
            check(
                "open-mmmu protocol",
                Protocol::OpenMmmu.score(pred, gold).to_string(),
                w.to_string(),
            );
        }
        let w = pf["f1"].as_f64().expect("number");
        if !close(Protocol::OpenF1.score(pred, gold), w) {
            check(
                "open-f1",
                Protocol::OpenF1.score(pred, gold).to_string(),
                w.to_string(),
            );
        }
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert!(crashes > 0, "the fixture has MedEvalKit crash cases");
}

#!/usr/bin/env python3
"""Runs the ORIGINAL scoring rules of the medical VQA harnesses on one shared set of
(prediction, gold answer) cases and writes tests/fixtures/score/reference.json, against which
`tests/suite/score.rs` checks every protocol of `src/data/score.rs`.

The harness files are imported from source checkouts given on the command line (the commit of
each is recorded in the fixture), not copied here:

    M=$(mktemp -d); git -C <MedEvalKit git dir> archive 9b12e3b34232a8779cc1275417bf4f72f03d28e0 utils | tar -x -C $M
    L=$(mktemp -d); git -C <LLaVA-Med git dir> archive v1.0.0 llava/eval/eval_metrics/{__init__,glossary,evaluate_metrics,utils}.py | tar -x -C $L
    E=$(mktemp -d); git -C <lmms-eval git dir> archive 75571cfe0fa36ca5ec2e6aa2bb268f9d38295af3 lmms_eval/tasks/slake | tar -x -C $E
    U=$(mktemp -d); git -C <MMMU git dir> archive bb0b95a945998d91dfef37e969e07d49d1139438 mmmu/utils/eval_utils.py | tar -x -C $U
    pip install nltk==3.10.4 rouge==1.0.1 mathruler==0.1.0 pylatexenc sympy numpy
    python3 tools/score_reference.py --medevalkit $M --medevalkit-commit 9b12e3b… \
        --llava-med $L --llava-med-commit b9a98a7… --lmms-eval $E --lmms-eval-commit 75571cf… \
        --mmmu $U --mmmu-commit bb0b95a… --out tests/fixtures/score/reference.json

What is imported and what is stubbed:

* MedEvalKit `utils/utils.py` is loaded as a file. Its real dependencies nltk (sentence_bleu),
  rouge (Rouge) and mathruler (extract_boxed_content) must be installed; its LLM-judge
  dependencies (google.genai, openai, tenacity) are replaced by empty stubs, and `api_key` is
  set to a dummy so the module-level `judger = init_judger()` can build its (never used) client.
  The per-dataset step around the judges (`utils/SLAKE/SLAKE.py::cal_metrics`: pull out the last
  `\\boxed{}` or the `<answer>` blocks, then route closed items by `answer in ["yes","no"]`) lives
  inside a class whose module needs torch/datasets; those few lines are transcribed in
  `medevalkit_preextract` / `closed_medevalkit` below and call the imported functions.
* LLaVA-Med `llava/eval/eval_metrics/` (glossary.normalize_word, evaluate_metrics.calculate_f1score)
  is imported as a package; it needs only `re` and `math`. The two lines of
  `llava/eval/run_eval_batch.py::evaluate` that apply them (lower, normalize_word, `gt in pred`)
  are transcribed (that script needs pandas/tabulate and writes files).
* lmms-eval `lmms_eval/tasks/slake/utils.py` is loaded as a file with datasets, numpy,
  huggingface_hub, loguru and PIL stubbed (only used for loading and logging);
  `slake_process_results` itself is called.
* MMMU `mmmu/utils/eval_utils.py` is loaded as a file (it needs numpy, installed).
  `parse_multi_choice_response` + `eval_multi_choice` and `parse_open_response` + `eval_open`
  are called. Where the multiple-choice parser finds no candidate the original returns
  `random.choice(all_choices)`; the module's `random` is replaced by a stub whose `choice`
  returns None, so the fixture records `"parsed": null` and the case as wrong (medvlm's
  deterministic reading of that fallback; see `src/data/score.rs::mmmu_parse_choice`).

A case where the original raises (MedEvalKit's open-ended judge on an empty prediction) is
recorded with `"error"` instead of values.
"""

import argparse
import importlib.util
import json
import os
import sys
import types


def stub(name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    sys.modules[name] = mod
    return mod


def load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class _Anything:
    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return self

    def __getattr__(self, name):
        return self


def load_medevalkit(root):
    google = stub("google")
    google.genai = stub("google.genai", Client=_Anything)
    stub("openai", AzureOpenAI=_Anything, OpenAI=_Anything, AsyncAzureOpenAI=_Anything, AsyncOpenAI=_Anything)

    def retry(*a, **k):
        return lambda f: f

    stub("tenacity", retry=retry, stop_after_attempt=_Anything, wait_fixed=_Anything)
    os.environ.setdefault("api_key", "unused")
    return load_file("medevalkit_utils", os.path.join(root, "utils", "utils.py"))


def load_llava_med(root):
    sys.path.insert(0, os.path.join(root, "llava", "eval"))
    import eval_metrics.evaluate_metrics as em  # noqa: E402
    import eval_metrics.glossary as gl  # noqa: E402

    return em, gl


def load_mmmu(root):
    mod = load_file("mmmu_eval_utils", os.path.join(root, "mmmu", "utils", "eval_utils.py"))
    # The no-candidate fallback `random.choice(all_choices)` becomes "no answer" (None).
    mod.random = types.SimpleNamespace(choice=lambda seq: None)
    return mod


def load_lmms_eval(root):
    class Dataset:
        pass

    stub("datasets", Dataset=Dataset)
    stub("huggingface_hub", snapshot_download=_Anything)
    stub("loguru", logger=_Anything())
    pil = stub("PIL")

    class Image:
        pass

    pil.Image = stub("PIL.Image", Image=Image)
    if "numpy" not in sys.modules:
        try:
            import numpy  # noqa: F401
        except ImportError:
            stub("numpy")
    return load_file("lmms_slake_utils", os.path.join(root, "lmms_eval", "tasks", "slake", "utils.py"))


# -------------------------------------------------------------------------------------------
# The shared cases: (prediction, gold). Golds are the shapes the datasets really have
# (notes/26-research.md Part A): VQA-RAD/PathVQA lowercase yes/no, SLAKE capitalised Yes/No and
# Chinese polarity words, single- and multi-word open answers, numbers.
# -------------------------------------------------------------------------------------------

THINK = "<think>The lungs look clear, no nodule.</think>"

YES_NO_PREDICTIONS = [
    "yes", "Yes", "YES", "no", "No", "NO", "yes.", "Yes.", "No.", " yes", "yes ", "\nyes\n",
    "Yes, it is.", "No, it is not.", "yes, there is no effusion", "not sure", "The image is normal.",
    "There are no nodules.", "eyes are visible", "I don't know", "", "   ",
    "Answer: yes", "answer: no", "The answer is yes", "**Answer**: No", "Final answer: yes",
    "<answer>yes</answer>", "<answer> No </answer>", THINK + "<answer>yes</answer>",
    THINK + "\n<answer>no</answer>", "<answer>yes</answer><answer>no</answer>", "<answer></answer>",
    "\\boxed{yes}", "The answer is \\boxed{No}.", "\\boxed{yes} or \\boxed{no}", "\\boxed{",
    "boxed yes", "是的", "不是", "yes是的", "Y", "true", "False", "yeah",
]

YES_NO_GOLDS = ["yes", "no", "Yes", "No"]

ZH_CASES = [
    ("是的", "是的"), ("是", "是的"), ("是的。", "是的"), ("是的.", "是的"), ("不是", "是的"),
    ("不是", "不是"), ("否", "不是"), ("yes", "是的"), ("Yes", "是的"), ("no", "不是"),
    ("包含", "包含"), ("不包含", "包含"), ("不包含", "不包含"), ("有", "有"), ("没有", "有"),
    ("没有", "没有"), ("可以", "可以"), ("不可以", "不可以"), ("正常", "正常"), ("不正常", "不正常"),
    ("异常", "不正常"), ("肺", "肺"), ("肺。", "肺"), ("右肺", "肺"), ("肝脏", "肝脏"), ("肝脏和肾脏", "肝脏"),
    ("答案:是的", "是的"), ("答案：是的", "是的"), ("<answer>是的</answer>", "是的"),
    (THINK + "<answer>不是</answer>", "不是"), ("MRI", "MRI"), ("mri", "MRI"),
    ("左肺, 右肺", "左肺，右肺"), ("左肺，右肺", "左肺，右肺"),
]

OPEN_CASES = [
    # (prediction, gold)
    ("Lung", "Lung"), ("lung", "Lung"), ("LUNG", "Lung"), ("lung.", "Lung"), ("Lung!", "Lung"),
    (" lung", "Lung"), ("lung ", "Lung"), ("the lung", "Lung"), ("The Lung.", "Lung"),
    ("Left lung", "Lung"), ("The abnormality is in the lung.", "Lung"), ("lungs", "Lung"),
    ("Answer: lung", "Lung"), ("answer:lung", "Lung"), ("The answer is lung", "Lung"),
    ("<answer>lung</answer>", "Lung"), (THINK + "<answer>Lung</answer>", "Lung"),
    (THINK + "<answer> lung </answer>", "Lung"), ("\\boxed{lung}", "Lung"), ("", "Lung"),
    ("   ", "Lung"), (".", "Lung"), ("...", "Lung"), ("lung lung", "Lung"),
    ("left lung", "left lung"), ("Left Lung", "left lung"), ("left  lung", "left lung"),
    ("lung left", "left lung"), ("the left lung", "left lung"), ("left-lung", "left lung"),
    ("right lung", "left lung"), ("left", "left lung"), ("Left lung, right lung", "left lung"),
    ("Left Lung, Right", "Left Lung, Right"), ("left lung right", "Left Lung, Right"),
    ("Left lung and right lung", "Left Lung, Right"),
    ("CT", "CT"), ("ct", "CT"), ("CT scan", "CT"), ("CT (computed tomography)", "CT"),
    ("Computed tomography", "CT"), ("A CT", "CT"), ("an MRI", "MRI"), ("MRI.", "MRI"),
    ("T2", "T2"), ("T2-weighted", "T2"), ("t2 weighted mri", "T2"),
    ("x-ray", "X-Ray"), ("X-Ray", "X-Ray"), ("xray", "X-Ray"), ("X ray", "X-Ray"),
    ("X-ray.", "x-ray"), ("radiograph", "X-Ray"),
    ("2", "2"), ("two", "2"), ("Two", "2"), ("2.", "2"), ("2.5", "2.5"), ("2.50", "2.5"),
    ("2,5", "2.5"), ("There are 2 nodules.", "2"), ("none", "0"), ("zero", "0"), ("0", "0"),
    ("1,000", "1000"), ("1000", "1,000"), ("ten", "10"), ("10 mm", "10"),
    ("Coronal Plane", "Coronal Plane"), ("coronal", "Coronal Plane"), ("coronal plane.", "Coronal Plane"),
    ("The coronal plane", "Coronal Plane"), ("axial plane", "Coronal Plane"),
    ("Heart, liver", "Heart;Liver"), ("heart and liver", "Heart;Liver"), ("heart liver", "Heart;Liver"),
    ("heart/liver", "Heart/Liver"), ("heart / liver", "Heart/Liver"),
    ("pleural effusion", "Pleural Effusion"), ("Pleural effusion on the right side", "Pleural Effusion"),
    ("effusion", "Pleural Effusion"), ("isnt", "isn't"), ("dont know", "don't know"),
    ("Brain Edema", "Brain Edema"), ("brain edema and brain tumor", "Brain Edema"),
    ("\"liver\"", "Liver"), ("(liver)", "Liver"), ("[liver]", "Liver"), ("liver?", "Liver"),
    ("liver\nkidney", "Liver"), ("liver\tkidney", "liver kidney"), ("liver\u3000kidney", "liver kidney"),
    ("Liver: yes", "Liver"), ("**Answer**: liver", "Liver"), ("**answer:** liver", "Liver"),
    ("final answer is liver", "Liver"), ("\\boxed{\\text{liver}}", "Liver"),
    ("<answer>liver</answer> <answer>kidney</answer>", "liver kidney"),
    ("<answer>", "Liver"), ("</answer>liver<answer>", "Liver"),
    ("ÉDÈME", "édème"), ("İliac", "iliac"), ("ΣΟΦΙΑΣ", "σοφιας"),
    ("a", "a"), ("the", "the"), ("an apple", "apple"), ("A", "A"),
    ("yes", "Lung"), ("no", "Lung"), ("no nodule", "nodule"), ("Yes", "Yes"),
    ("Left side, apex", "left side apex"), ("left_side", "left side"), ("left@side", "left side"),
    ("1.5 cm", "1.5cm"), ("1.5cm.", "1.5cm"), ("Mr. Smith", "mr smith"),
    ("a.b.c", "abc"), ("e.g. lung", "eg lung"),
    # LLaVA-Med deletes at most 32 periods (re.UNICODE passed as re.sub's count).
    ("." * 40 + "lung", "lung"), ("lung" + ". " * 35, "lung"),
    # MedEvalKit cuts at answer phrases with str.split (non-overlapping, left to right).
    ("**answer**answer** lung", "lung"), ("**answer**answer**", "answer**"),
]

# MMMU-style open answers (numbers with trailing zeros, units, answer phrases, equations).
MMMU_OPEN_CASES = [
    ("3.5", "3.5"), ("3.50", "3.5"), ("3.5", "3.50"), ("3.504", "3.5"), ("3.505", "3.51"),
    ("3.515", "3.52"), ("0.125", "0.12"), ("2.675", "2.67"), ("1,234.5", "1234.5"), ("1234.5", "1,234.5"),
    ("-2", "-2"), ("-2", "2"), ("The answer is 42 mg.", "42"), ("The dose is 42 mg", "42 mg"),
    ("So the volume is 12 mL", "12"), ("Thus x = 7", "7"), ("x = 7", "7"), ("7 = x", "7"),
    ("The final answer: 1.2e3", "1200"), ("1.2e3", "1.2e3"), ("1e-3 mol", "0.001"),
    ("Therefore the pressure is 120/80 mmHg.", "120/80 mmHg"), ("120 mmHg", "120"),
    ("It is 5 cm. So the answer is 6 cm.", "6"), ("It is 5 cm.\nSo the answer is 6 cm.", "5"),
    ("It is 5 cm.\nSo the answer is 6 cm.", "6"), ("The answer is \n", "answer"),
    ("The answer is .", "."), ("the result is b", "b"), ("b", "B"), ("ab", "b"), ("a b c", "b"),
    ("Answer: 10%", "10%"), ("10 percent", "10"), ("about 1,000,000 cells", "1000000"),
    ("inf", "inf"), ("nan", "nan"), ("1_000", "1000"), ("+5", "5"), (".5", "0.5"), ("5.", "5"),
    ("12345", "12,345"), ("12,34", "1234"), ("3x", "3"), ("x3", "3"), ("-.5 V", "-0.5"),
    ("The heart rate could be 72 bpm", "72"), ("answer 88", "88"), ("final 9", "9"),
    ("is ", "is"), ("so so so fine", "fine"),
]

# MMMU-style multiple choice: (response, options, gold index). The gold is a letter A, B, ….
MMMU_OPTIONS = ["Pneumonia", "Pleural effusion", "Pneumothorax", "Atelectasis"]
MMMU_MC_CASES = [
    (r, MMMU_OPTIONS, 1)
    for r in [
        "B", "(B)", "The answer is (B)", "The answer is (B).", "B. Pleural effusion", "B.",
        "b", "(b)", "Answer: B", "answer: B", "B,", "'B'", "...B...", "B!?",
        "Pleural effusion", "The finding is most consistent with pleural effusion on the right side.",
        "The finding is most consistent with pneumothorax and not pleural effusion here.",
        "It is either pleural effusion or pneumothorax, probably pneumothorax in this case.",
        "(A) or (B)", "(B) or (A)", "A or B", "B or A", "A B C D", "(C) is wrong, (B) is right",
        "I think C", "I think C is the answer, B is not", "C B", "ABC", "(B)(C)", "",
        "no idea", "The options are A B C", "pneumo", "Pneumonia.",
        "We see a pneumothorax in the image; the answer is (C)", "The answer is C.",
        "A) Pneumonia", "<answer>B</answer>", "\\boxed{B}", "I would choose option B here",
    ]
] + [
    ("The answer is (C)", MMMU_OPTIONS, 2), ("Pneumothorax", MMMU_OPTIONS, 2), ("no idea", MMMU_OPTIONS, 0),
    ("Lung cancer is seen on the scan image here.", ["Lung", "Lung cancer", "Heart", "Liver"], 1),
    ("Lung is seen on the scan image here.", ["Lung cancer", "Lung", "Heart", "Liver"], 1),
    ("The scan image shows the heart and no liver here.", ["Lung", "", "Heart", "Liver"], 1),
    ("(E) Other", ["a", "b", "c", "d", "e"], 4),
    ("E", ["a", "b", "c", "d"], 3),
]

# Multiple-choice letters are NOT here: `mc-letter` is our own rule (data::answer), with no
# Python original to compare against; it is unit-tested in Rust.


def all_cases():
    cases = []
    for g in YES_NO_GOLDS:
        for p in YES_NO_PREDICTIONS:
            cases.append((p, g))
    cases.extend(ZH_CASES)
    cases.extend(OPEN_CASES)
    seen = set()
    out = []
    for c in cases:
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--medevalkit", required=True, help="checkout holding utils/utils.py")
    ap.add_argument("--medevalkit-commit", required=True)
    ap.add_argument("--llava-med", required=True, help="checkout holding llava/eval/eval_metrics/")
    ap.add_argument("--llava-med-commit", required=True)
    ap.add_argument("--lmms-eval", required=True, help="checkout holding lmms_eval/tasks/slake/utils.py")
    ap.add_argument("--lmms-eval-commit", required=True)
    ap.add_argument("--mmmu", required=True, help="checkout holding mmmu/utils/eval_utils.py")
    ap.add_argument("--mmmu-commit", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import warnings

    warnings.simplefilter("ignore")  # nltk warns on every zero n-gram overlap

    mek = load_medevalkit(args.medevalkit)
    llm_em, llm_gl = load_llava_med(args.llava_med)
    lmms = load_lmms_eval(args.lmms_eval)
    mmmu = load_mmmu(args.mmmu)
    import mathruler
    import nltk

    def medevalkit_preextract(response):
        # utils/SLAKE/SLAKE.py::cal_metrics (same lines in VQA_RAD.py / PATH_VQA.py).
        if mek.extract_boxed_content(response) != "None":
            response = mek.extract_boxed_content(response)
        elif "<answer>" in response:
            response = mek.extract(response, "answer")
        return response

    def closed_medevalkit(pred, gold):
        # SLAKE.py::cal_metrics, CLOSED branch: `answer` is the raw gold, tested case-sensitively.
        response = medevalkit_preextract(pred)
        if gold in ["yes", "no"]:
            return bool(mek.judge_judgement(gold, response))
        return bool(mek.judge_close_end_vqa(gold, response))

    def closed_corrected(pred, gold):
        # The same, with the gold lowercased and stripped before the yes/no test (as
        # VQA_RAD.py / PATH_VQA.py do): "Yes" reaches judge_judgement.
        response = medevalkit_preextract(pred)
        g = gold.lower().strip()
        if g in ["yes", "no"]:
            return bool(mek.judge_judgement(g, response))
        return bool(mek.judge_close_end_vqa(gold, response))

    def open_medevalkit(pred, gold):
        # SLAKE.py::cal_metrics, OPEN branch: judge_open_end_vqa(answer, response).
        response = medevalkit_preextract(pred)
        try:
            m = mek.judge_open_end_vqa(gold, response)
        except Exception as e:  # the original crashes on empty token sets
            return {"error": f"{type(e).__name__}: {e}"}
        # ROUGE is not recorded: src/data/score.rs does not re-implement it.
        return {k: (bool(v) if k == "em" else float(v)) for k, v in m.items() if not k.startswith("rouge")}

    def open_exact(pred, gold):
        doc = {"answer": gold}
        rec = lmms.slake_process_results(doc, [pred])["slake_accuracy"]
        return {
            "correct": bool(rec["is_correct"]),
            "prediction_normalized": rec["prediction_normalized"],
            "target_normalized": rec["target_normalized"],
        }

    def llava_norm(s):
        # run_eval_batch.py::evaluate: `normalize_word(x.lower())` on both sides.
        return llm_gl.normalize_word(s.lower())

    def open_recall_llavamed(pred, gold):
        return llava_norm(gold) in llava_norm(pred)

    def open_f1(pred, gold):
        f1, p, r = llm_em.calculate_f1score(llava_norm(pred), llava_norm(gold))
        return {"f1": float(f1), "precision": float(p), "recall": float(r)}

    def py_value(v):
        # A parsed MMMU prediction: a float (as Python's repr, since JSON has no inf/nan) or a string.
        return {"number": repr(v)} if isinstance(v, float) else {"text": v}

    def open_mmmu(pred, gold):
        # mmmu/utils/eval_utils.py: parse_open_response, then eval_open against the gold string.
        parsed = mmmu.parse_open_response(pred)
        ordered = sorted(parsed, key=lambda v: (isinstance(v, str), repr(v)))
        return {"correct": bool(mmmu.eval_open(gold, parsed)), "parsed": [py_value(v) for v in ordered]}

    def mc_mmmu(resp, options, gold_index):
        # MMMU's get_multi_choice_info: letters A, B, … for the options in order.
        all_choices = [chr(ord("A") + i) for i in range(len(options))]
        index2ans = dict(zip(all_choices, options))
        parsed = mmmu.parse_multi_choice_response(resp, all_choices, index2ans)
        gold = all_choices[gold_index]
        return {"parsed": parsed, "correct": bool(mmmu.eval_multi_choice(gold, parsed))}

    mc_cases = []
    for i, (resp, options, g) in enumerate(MMMU_MC_CASES):
        mc_cases.append({"id": i, "prediction": resp, "options": options, "gold_index": g,
                         "mc-mmmu": mc_mmmu(resp, options, g)})

    out_cases = []
    shared = all_cases()
    shared += [c for c in MMMU_OPEN_CASES if c not in set(shared)]
    for i, (pred, gold) in enumerate(shared):
        out_cases.append(
            {
                "id": i,
                "prediction": pred,
                "answer": gold,
                "closed-medevalkit": closed_medevalkit(pred, gold),
                "closed": closed_corrected(pred, gold),
                "open-medevalkit": open_medevalkit(pred, gold),
                "open-exact": open_exact(pred, gold),
                "open-recall-llavamed": open_recall_llavamed(pred, gold),
                "open-f1": open_f1(pred, gold),
                "open-mmmu": open_mmmu(pred, gold),
                "llavamed_normalized": {"prediction": llava_norm(pred), "answer": llava_norm(gold)},
            }
        )

    fixture = {
        "generated_by": "tools/score_reference.py",
        "python": sys.version.split()[0],
        "sources": {
            "MedEvalKit": {
                "repo": "alibaba-damo-academy/MedEvalKit",
                "commit": args.medevalkit_commit,
                "files": ["utils/utils.py", "utils/SLAKE/SLAKE.py (cal_metrics, transcribed)"],
            },
            "LLaVA-Med": {
                "repo": "microsoft/LLaVA-Med",
                "commit": args.llava_med_commit,
                "files": [
                    "llava/eval/eval_metrics/glossary.py",
                    "llava/eval/eval_metrics/evaluate_metrics.py",
                    "llava/eval/run_eval_batch.py (evaluate, transcribed)",
                ],
            },
            "lmms-eval": {
                "repo": "EvolvingLMMs-Lab/lmms-eval",
                "commit": args.lmms_eval_commit,
                "files": ["lmms_eval/tasks/slake/utils.py"],
            },
            "MMMU": {
                "repo": "MMMU-Benchmark/MMMU",
                "commit": args.mmmu_commit,
                "files": ["mmmu/utils/eval_utils.py"],
            },
        },
        "packages": {
            "nltk": nltk.__version__,
            "rouge": "1.0.1",
            "mathruler": getattr(mathruler, "__version__", "0.1.0"),
            "numpy": sys.modules["numpy"].__version__,
        },
        "mc_cases": mc_cases,
        "cases": out_cases,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        # One case a line: small, and diffs of a regenerated fixture stay readable.
        cases = fixture.pop("cases")
        mc = fixture.pop("mc_cases")
        head = json.dumps(fixture, ensure_ascii=False, indent=1)
        f.write(head[:-2] + ',\n "mc_cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in mc))
        f.write('\n ],\n "cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n ]\n}\n")
    print(f"{len(out_cases)} cases, {len(mc_cases)} multiple-choice cases -> {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()

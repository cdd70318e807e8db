#!/usr/bin/env python3
"""Writes tests/fixtures/bench/: a few rows of each medical VQA benchmark in the layout users
download it (docs: /work/notes/26-research.md Part A), with the libraries those layouts come
from: pyarrow for the Hugging Face parquet files (the `datasets` Image feature, a struct
`{bytes: binary, path: string}`, snappy-compressed as pyarrow writes by default), json for
SLAKE / OmniMedVQA / MedXpertQA, pandas' CSV writer for PMC-VQA, Pillow for the images.

Beside the files, `expected.json` holds what a loader must find, counted here from this
script's own rows and rules (not by medvlm): items per split, modality, answer kind
(choice / closed / open) and language, the number of images, and skipped rows per reason.

    pip install pyarrow pillow pandas
    python tools/make_bench_fixtures.py [--out tests/fixtures/bench]
"""

import argparse
import io
import json
import os
import shutil
from collections import Counter

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

# Skip kinds, as medvlm names them (data::Skipped::kind).
MISSING_IMAGE = "missing image"
NO_IMAGE = "no image"
NOT_AMONG = "answer not among the options"
NO_ANSWER = "no answer"
UNKNOWN_TYPE = "unknown answer type"
UNKNOWN_LANG = "unknown language"
BAD_OPTIONS = "bad options"
MALFORMED = "malformed row"

# The modality names medvlm normalises the raw strings of these fixtures to.
MODALITY = {
    "CT": "CT",
    "MRI": "MRI",
    "X-Ray": "X-Ray",
    "CT(Computed Tomography)": "CT",
    "MR (Mag-netic Resonance Imaging)": "MRI",
    "Fundus Photography": "Fundus",
    "Microscopy Images": "Microscopy",
}


def image_bytes(seed, fmt="PNG", size=(8, 8)):
    img = Image.new("RGB", size, ((seed * 40) % 256, (seed * 90) % 256, (seed * 20) % 256))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def save_image(path, seed, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(image_bytes(seed, fmt))


class Tally:
    """What a loader must report for one benchmark."""

    def __init__(self):
        self.items = 0
        self.split = Counter()
        self.modality = Counter()
        self.kind = Counter()
        self.language = Counter()
        self.skipped = Counter()
        self.images = 0

    def item(self, split, kind, modality="none", language="en", images=1):
        self.items += 1
        self.split[split] += 1
        self.kind[kind] += 1
        self.modality[modality] += 1
        self.language[language] += 1
        self.images += images

    def skip(self, why):
        self.skipped[why] += 1

    def json(self):
        return {
            "items": self.items,
            "split": dict(sorted(self.split.items())),
            "modality": dict(sorted(self.modality.items())),
            "kind": dict(sorted(self.kind.items())),
            "language": dict(sorted(self.language.items())),
            "images": self.images,
            "skipped": dict(sorted(self.skipped.items())),
        }


# The `datasets` Image feature as parquet stores it, with the schema metadata `datasets` writes.
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def hf_metadata(features):
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def closed_by_rule(answer):
    # VQA-RAD / PathVQA harness rule (MedEvalKit, lmms-eval): yes/no answers are closed.
    return answer.lower().strip() in ["yes", "no"]


def write_yes_no_vqa(root, shards):
    """VQA-RAD / PathVQA: data/<split>-0000i-of-0000n-<hash>.parquet, columns image, question,
    answer. `shards` maps split -> list of shards -> list of (image seed | None, question,
    answer)."""
    tally = Tally()
    features = {
        "image": {"_type": "Image"},
        "question": {"dtype": "string", "_type": "Value"},
        "answer": {"dtype": "string", "_type": "Value"},
    }
    schema = pa.schema(
        [("image", IMAGE_STRUCT), ("question", pa.string()), ("answer", pa.string())],
        metadata=hf_metadata(features),
    )
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    for split, parts in shards.items():
        for i, rows in enumerate(parts):
            images, questions, answers = [], [], []
            for seed, q, a in rows:
                images.append(None if seed is None else {"bytes": image_bytes(seed, "JPEG"), "path": None})
                questions.append(q)
                answers.append(a)
                if seed is None:
                    tally.skip(NO_IMAGE)
                elif a.strip() == "":
                    tally.skip(NO_ANSWER)
                else:
                    tally.item(split, "closed" if closed_by_rule(a) else "open")
            table = pa.table({"image": images, "question": questions, "answer": answers}, schema=schema)
            name = f"{split}-{i:05d}-of-{len(parts):05d}-{split[:2]}{i}f00d.parquet"
            pq.write_table(table, os.path.join(root, "data", name))
    return tally


def write_vqa_rad(root):
    return write_yes_no_vqa(
        root,
        {
            "train": [[(1, "is there a fracture?", "yes"), (2, "which lobe?", "left lower lobe"), (3, "is this normal?", " No ")]],
            "test": [[(4, "is the heart enlarged?", "YES"), (5, "what organ is shown?", "liver"), (None, "is there free air?", "no")]],
        },
    )


def write_path_vqa(root):
    return write_yes_no_vqa(
        root,
        {
            "train": [[(6, "is this necrosis?", "yes")]],
            "validation": [[(7, "what stain?", "h&e")]],
            # Two shards: rows count across them in file order.
            "test": [
                [(8, "are the cells atypical?", "no"), (9, "what is present?", "granuloma")],
                [(10, "is inflammation seen?", "yes"), (11, "what does this show?", "")],
            ],
        },
    )


def write_slake(root):
    tally = Tally()
    imgs = {"xmlab1/source.jpg": 1, "xmlab2/source.jpg": 2, "xmlab3/source.jpg": 3}
    for name, seed in imgs.items():
        save_image(os.path.join(root, "imgs", name), seed, "JPEG")
    rid = [0]

    def row(img, q, a, lang, modality, atype, content="Organ"):
        rid[0] += 1
        return {
            "img_id": int(img[5]),
            "img_name": img,
            "question": q,
            "answer": a,
            "q_lang": lang,
            "location": "Lung",
            "modality": modality,
            "answer_type": atype,
            "base_type": "vqa",
            "content_type": content,
            "triple": ["vhead", "_", "_"],
            "qid": 10000 + rid[0],
        }

    splits = {
        "train": [
            row("xmlab1/source.jpg", "Is this a CT?", "Yes", "en", "CT", "CLOSED"),
            row("xmlab2/source.jpg", "这是什么器官?", "肺", "zh", "MRI", "OPEN"),
        ],
        "validation": [
            row("xmlab3/source.jpg", "What is shown?", "Lung", "en", "X-Ray", "OPEN"),
        ],
        "test": [
            row("xmlab1/source.jpg", "What modality is used to take this image?", "CT", "en", "CT", "OPEN", "Modality"),
            row("xmlab1/source.jpg", "Is the lung healthy?", "No", "en", "CT", "CLOSED", "Abnormality"),
            row("xmlab2/source.jpg", "Which organ is larger, liver or lung?", "Lung", "en", "MRI", "CLOSED"),
            row("xmlab2/source.jpg", "图中有肝脏吗?", "是的", "zh", "MRI", "CLOSED"),
            row("xmlab3/source.jpg", "这张图片的成像方式是什么?", "X-Ray", "zh", "X-Ray", "OPEN", "Modality"),
            # Skipped: the image is not in imgs/.
            row("xmlab9/source.jpg", "Is this normal?", "Yes", "en", "CT", "CLOSED"),
            # Skipped: neither OPEN nor CLOSED.
            row("xmlab3/source.jpg", "What is abnormal?", "Nodule", "en", "X-Ray", "UNSURE"),
            # Skipped: a language SLAKE does not have.
            row("xmlab3/source.jpg", "Quelle modalité?", "CT", "fr", "X-Ray", "OPEN"),
        ],
    }
    # Skipped: wrong types (a number where the question belongs).
    bad = row("xmlab3/source.jpg", "x", "y", "en", "X-Ray", "OPEN")
    bad["question"] = 42
    splits["test"].append(bad)
    for split, rows in splits.items():
        with open(os.path.join(root, f"{split}.json"), "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)
        for r in rows:
            if not isinstance(r["question"], str):
                tally.skip(MALFORMED)
            elif not os.path.isfile(os.path.join(root, "imgs", r["img_name"])):
                tally.skip(MISSING_IMAGE)
            elif r["answer_type"] not in ("OPEN", "CLOSED"):
                tally.skip(UNKNOWN_TYPE)
            elif r["q_lang"] not in ("en", "zh"):
                tally.skip(UNKNOWN_LANG)
            else:
                tally.item(split, r["answer_type"].lower(), MODALITY[r["modality"]], r["q_lang"])
    return tally


def write_pmc_vqa(root):
    tally = Tally()
    for i, name in enumerate(["PMC1_F1.jpg", "PMC2_F2.jpg", "PMC3_F3.jpg"]):
        save_image(os.path.join(root, "images", name), 20 + i, "JPEG")
    for i, name in enumerate(["PMC8_F1.jpg", "PMC9_F2.jpg"]):
        save_image(os.path.join(root, "figures", name), 30 + i, "JPEG")

    def count(split, folder, fig, options, label):
        if not os.path.isfile(os.path.join(root, folder, fig)):
            tally.skip(MISSING_IMAGE)
        elif label not in "ABCD"[: len(options)] or len(label) != 1:
            tally.skip(NOT_AMONG)
        else:
            tally.item(split, "choice")

    # v1 (test_clean.csv): choices carry "A:" prefixes (with spaces, as evalscope saw them);
    # the letter is Answer_label, Answer the text.
    v1 = [
        ("PMC1_F1.jpg", "What pattern is seen?", "Focal uptake", ["Diffuse uptake", "Focal uptake", "No uptake", "Ring uptake"], "B"),
        ("PMC2_F2.jpg", 'Which "sign", if any, is present?', "Air bronchogram", ["Air bronchogram", "Halo", "Tree-in-bud", "None"], "A"),
        ("PMC3_F3.jpg", "Which imaging\nmodality was used?", "Magnetic resonance imaging", ["CT", "Magnetic resonance imaging", "PET", "X-ray"], "B"),
        ("PMC4_F4.jpg", "What is shown?", "A cyst", ["A cyst", "A mass", "A stone", "Nothing"], "A"),
        ("PMC1_F1.jpg", "Where is the lesion?", "Apex", ["Base", "Hilum", "Apex", "Pleura"], "E"),
    ]
    df = pd.DataFrame(
        {
            "Figure_path": [r[0] for r in v1],
            "Question": [r[1] for r in v1],
            "Answer": [r[2] for r in v1],
            "Choice A": [f" A:{r[3][0]} " for r in v1],
            "Choice B": [f" B:{r[3][1]} " for r in v1],
            "Choice C": [f" C:{r[3][2]} " for r in v1],
            "Choice D": [f" D:{r[3][3]} " for r in v1],
            "Answer_label": [r[4] for r in v1],
        }
    )
    df.to_csv(os.path.join(root, "test_clean.csv"), index=False)
    for r in v1:
        count("test_clean", "images", r[0], r[3], r[4])

    # v2 (test_2.csv), the 10 columns MedEvalKit unpacks: index, Figure_path, Caption, Question,
    # Choice A-D, Answer (the letter), split; images under figures/.
    v2 = [
        ("PMC8_F1.jpg", "A chest film.", "What is enlarged?", ["Heart", "Liver", "Spleen", "Kidney"], "A"),
        ("PMC9_F2.jpg", "An MRI, T2.", "Which sequence?", ["T1", "T2", "FLAIR", "DWI"], "B"),
        ("PMC7_F9.jpg", "Missing figure.", "What is seen?", ["a", "b", "c", "d"], "C"),
    ]
    df2 = pd.DataFrame(
        {
            "index": list(range(len(v2))),
            "Figure_path": [r[0] for r in v2],
            "Caption": [r[1] for r in v2],
            "Question": [r[2] for r in v2],
            "Choice A": [f"A:{r[3][0]}" for r in v2],
            "Choice B": [f"B:{r[3][1]}" for r in v2],
            "Choice C": [f"C:{r[3][2]}" for r in v2],
            "Choice D": [f"D:{r[3][3]}" for r in v2],
            "Answer": [r[4] for r in v2],
            "split": ["test"] * len(v2),
        }
    )
    df2.to_csv(os.path.join(root, "test_2.csv"), index=False)
    for r in v2:
        count("test_2", "figures", r[0], r[3], r[4])
    return tally


def write_omnimedvqa(root):
    tally = Tally()
    base = os.path.join(root, "OmniMedVQA")
    qa = os.path.join(base, "QA_information", "Open-access")
    os.makedirs(qa, exist_ok=True)
    ct = [
        "Images/Chest CT Scan/test/adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib/000139 (9).png",
        "Images/Chest CT Scan/test/normal/n1 (2).png",
    ]
    fundus = ["Images/Fundus Demo/a.png"]
    for i, p in enumerate(ct + fundus):
        save_image(os.path.join(base, p), 40 + i)

    def q(img, question, gt, options, modality, qtype, key="modality_type"):
        d = {"dataset": "x", "question_id": "q", "question_type": qtype, "question": question, "gt_answer": gt, "image_path": img, key: modality}
        for letter, o in zip("ABCD", options):
            d[f"option_{letter}"] = o
        return d

    files = {
        "Chest CT Scan": [
            q(ct[0], "What is the diagnosis?", "Adenocarcinoma", ["Adenocarcinoma", "Normal", "Squamous cell carcinoma", "Large cell carcinoma"], "CT(Computed Tomography)", "Disease Diagnosis"),
            q(ct[1], "Is this image normal?", "Yes", ["Yes", "No"], "CT(Computed Tomography)", "Disease Diagnosis"),
            # The record with `modality` instead of `modality_type`.
            q(ct[1], "Which organ is shown?", "Lung", ["Heart", "Lung", "Liver"], "CT(Computed Tomography)", "Anatomy Identification", key="modality"),
            # Skipped: gt_answer is not an option.
            q(ct[0], "What is the stage?", "Ib", ["IIa", "IIIb"], "CT(Computed Tomography)", "Lesion Grading"),
        ],
        "Fundus Demo": [
            q(fundus[0], "What modality is this?", "Fundus photography", ["MRI", "Fundus photography", "CT"], "Fundus Photography", "Modality Recognition"),
            # Skipped: the image does not exist.
            q("Images/Fundus Demo/missing.png", "Is there retinopathy?", "No", ["Yes", "No"], "Fundus Photography", "Disease Diagnosis"),
        ],
    }
    for name, rows in files.items():
        for i, d in enumerate(rows):
            d["dataset"] = name
            d["question_id"] = f"{name}_{i}"
        with open(os.path.join(qa, f"{name}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        for d in rows:
            options = [d[f"option_{l}"] for l in "ABCD" if f"option_{l}" in d]
            raw = d.get("modality_type", d.get("modality"))
            if not os.path.isfile(os.path.join(base, d["image_path"])):
                tally.skip(MISSING_IMAGE)
            elif d["gt_answer"] not in options:
                tally.skip(NOT_AMONG)
            else:
                tally.item("test", "choice", MODALITY[raw])
    # Restricted-access: not read (its images are not in the archive).
    ra = os.path.join(base, "QA_information", "Restricted-access")
    os.makedirs(ra, exist_ok=True)
    with open(os.path.join(ra, "Restricted.json"), "w") as f:
        json.dump([q("Images/R/r.png", "q?", "a", ["a", "b"], "X-Ray", "Disease Diagnosis")], f)
    return tally


def py_list(options):
    # What MMMU's `options` column holds: str() of a Python list.
    return str(options)


def write_mmmu(root):
    tally = Tally()
    features = {"id": {"dtype": "string", "_type": "Value"}}
    for k in range(1, 8):
        features[f"image_{k}"] = {"_type": "Image"}
    fields = [("id", pa.string()), ("question", pa.string()), ("options", pa.string()), ("explanation", pa.string())]
    fields += [(f"image_{k}", IMAGE_STRUCT) for k in range(1, 8)]
    fields += [(n, pa.string()) for n in ["img_type", "answer", "topic_difficulty", "question_type", "subfield"]]
    schema = pa.schema(fields, metadata=hf_metadata(features))

    def row(rid, question, options, answer, n_images, qtype="multiple-choice", options_raw=None):
        d = {
            "id": rid,
            "question": question,
            "options": options_raw if options_raw is not None else py_list(options),
            "explanation": "",
            "img_type": "['Body Scans: MRI, CT scans, and X-rays']",
            "answer": answer,
            "topic_difficulty": "Medium",
            "question_type": qtype,
            "subfield": "Radiology",
        }
        for k in range(1, 8):
            d[f"image_{k}"] = {"bytes": image_bytes(50 + k, "PNG"), "path": f"img{k}.png"} if k <= n_images else None
        return d, options, n_images

    subjects = {
        "Clinical_Medicine": {
            "dev": [row("dev_Clinical_Medicine_1", "<image 1> What is shown?", ["Fracture", "Tumor", "Normal"], "B", 1)],
            "validation": [
                row("validation_Clinical_Medicine_1", "Compare <image 1> and <image 2>. Which is later?", ["The first", "The second"], "B", 2),
                # Options with quotes and a backslash, as Python's str() writes them.
                row("validation_Clinical_Medicine_2", "Which sign? <image 1>", ["Murphy's sign", 'The "halo" sign', "a\\b", "None"], "A", 1),
                # An open question: options "[]", the answer a value.
                row("validation_Clinical_Medicine_3", "How many lesions are in <image 1>?", [], "3", 1, qtype="open"),
                # Text only: no image at all.
                row("validation_Clinical_Medicine_4", "Which vitamin deficiency causes scurvy?", ["Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K"], "B", 0),
                # Skipped: the letter is past the options.
                row("validation_Clinical_Medicine_5", "<image 1> Which?", ["x", "y"], "D", 1),
                # Skipped: options that are not a Python list of strings.
                row("validation_Clinical_Medicine_6", "<image 1> Which?", None, "A", 1, options_raw="['x', __import__('os')]"),
            ],
            # The public test split has no answers.
            "test": [row("test_Clinical_Medicine_1", "<image 1> What is it?", ["a", "b", "c"], "?", 1)],
        },
        "Pharmacy": {
            "validation": [
                row("validation_Pharmacy_1", "Seven structures: <image 1> <image 2> <image 3> <image 4> <image 5> <image 6> <image 7>. Which is aspirin?", ["1", "2", "3", "4", "5", "6", "7"], "G", 7),
                row("validation_Pharmacy_2", "What is the dose in mg? <image 1>", [], "2070.33", 1, qtype="open"),
            ],
        },
        # Not a Health & Medicine subject: a loader given the MMMU root leaves it out.
        "Art": {"validation": [row("validation_Art_1", "<image 1> Which painter?", ["a", "b"], "A", 1)]},
    }
    for subject, splits in subjects.items():
        os.makedirs(os.path.join(root, subject), exist_ok=True)
        for split, rows in splits.items():
            table = pa.Table.from_pylist([r[0] for r in rows], schema=schema)
            pq.write_table(table, os.path.join(root, subject, f"{split}-00000-of-00001.parquet"))
            if subject == "Art":
                continue
            for d, options, n in rows:
                if options is None:
                    tally.skip(BAD_OPTIONS)
                elif d["answer"] in ("", "?"):
                    tally.skip(NO_ANSWER)
                elif d["question_type"] == "open":
                    tally.item(split, "open", images=n)
                elif not (len(d["answer"]) == 1 and 0 <= ord(d["answer"]) - ord("A") < len(options)):
                    tally.skip(NOT_AMONG)
                else:
                    tally.item(split, "choice", images=n)
    return tally


def write_medxpertqa(root):
    tally = Tally()
    names = ["MM-0-a.jpeg", "MM-0-b.jpeg", "MM-1-a.jpeg", "MM-2-a.jpeg", "MM-2-b.jpeg", "MM-2-c.jpeg", "MM-9-a.jpeg"]
    for i, n in enumerate(names):
        save_image(os.path.join(root, "images", n), 60 + i, "JPEG")
    opts = {"A": "Pneumonia", "B": "Effusion", "C": "Pneumothorax", "D": "Edema", "E": "Normal"}

    def row(rid, images, label, question="A 54-year-old presents with dyspnea. What is the diagnosis?"):
        q = question + "\nAnswer Choices: " + " ".join(f"({k}) {v}" for k, v in opts.items())
        return {
            "id": rid,
            "question": q,
            "options": opts,
            "label": label,
            "images": images,
            "medical_task": "Diagnosis",
            "body_system": "Respiratory",
            "question_type": "Reasoning",
        }

    splits = {
        "dev": [row("MM-9", ["MM-9-a.jpeg"], "E")],
        "test": [
            row("MM-0", ["MM-0-a.jpeg", "MM-0-b.jpeg"], "A"),
            row("MM-1", ["MM-1-a.jpeg"], "C"),
            row("MM-2", ["MM-2-a.jpeg", "MM-2-b.jpeg", "MM-2-c.jpeg"], "D"),
            # Skipped: one image is missing.
            row("MM-3", ["MM-3-a.jpeg", "MM-0-a.jpeg"], "B"),
            # Skipped: the label is not an option's key.
            row("MM-4", ["MM-1-a.jpeg"], "F"),
        ],
    }
    os.makedirs(os.path.join(root, "MM"), exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(root, "MM", f"{split}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        for r in rows:
            if not all(os.path.isfile(os.path.join(root, "images", n)) for n in r["images"]):
                tally.skip(MISSING_IMAGE)
            elif r["label"] not in r["options"]:
                tally.skip(NOT_AMONG)
            else:
                tally.item(split, "choice", images=len(r["images"]))
    return tally


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "bench"))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if os.path.isdir(out):
        shutil.rmtree(out)
    writers = {
        "vqa-rad": write_vqa_rad,
        "path-vqa": write_path_vqa,
        "slake": write_slake,
        "pmc-vqa": write_pmc_vqa,
        "omnimedvqa": write_omnimedvqa,
        "mmmu": write_mmmu,
        "medxpertqa": write_medxpertqa,
    }
    expected = {}
    for name, write in writers.items():
        root = os.path.join(out, name)
        os.makedirs(root, exist_ok=True)
        expected[name] = write(root).json()
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(out) for n in ns)
    print(f"wrote {out} ({total} bytes)")


if __name__ == "__main__":
    main()

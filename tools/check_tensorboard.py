#!/usr/bin/env python3
"""Check medvlm's TensorBoard event files against TensorBoard itself.

medvlm writes a run's metrics as TensorBoard event files (src/train/tensorboard.rs, its own
writer: the few protobuf fields of a scalar event written by hand, in TFRecord framing). This
script checks those files with the `tensorboard` package, an independent implementation.

    python3 -m venv /tmp/tbvenv && /tmp/tbvenv/bin/pip install tensorboard
    /tmp/tbvenv/bin/python tools/check_tensorboard.py --make-fixture
    /tmp/tbvenv/bin/python tools/check_tensorboard.py --check runs/grpo

--make-fixture
    Writes tests/fixtures/tensorboard/: an event file written by TensorBoard's own code (its
    protobuf messages, event_pb2 / summary_pb2, serialized by protobuf, framed by its
    RecordWriter) for a fixed set of events, and scalars.json describing them (steps,
    wall_times, tags, values). The unit test in src/train/tensorboard.rs writes the same events
    with medvlm's writer and compares the bytes. The file-version event is written as medvlm
    writes it (wall_time, file_version "brain.Event:2"); TensorBoard's EventFileWriter adds
    source_metadata naming itself and stamps the current time, which is why the record writer
    is used rather than EventFileWriter. Wall times are binary fractions (exact in JSON).

--check RUN_DIR
    Reads RUN_DIR/tensorboard/ with TensorBoard's EventAccumulator (orphan purging off, so
    a duplicated step would show) and compares every scalar with RUN_DIR/metrics.jsonl: each
    finite number of each record (nested objects flattened with "/", the record's "step"
    excluded) must appear exactly once, at the record's step, equal to the number as float32;
    and the event files must hold nothing else. Prints a summary; exits 1 on any mismatch.

CI does not run this script (it needs the tensorboard package); the fixture it wrote is
committed, and the Rust tests read it.
"""

import argparse
import json
import math
import os
import struct
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.join(REPO, "tests", "fixtures", "tensorboard")

# The fixture's events: binary-fraction wall times, a step with a multi-byte varint, values
# that f32 rounds (ln 2, 0.1), zero (written: simple_value is in a oneof), negatives, tiny and
# large magnitudes, nested-looking tags, a non-ASCII tag and one longer than 127 bytes.
FILE_VERSION_WALL_TIME = 1700000000.25
EVENTS = [
    {
        "step": 1,
        "wall_time": 1700000001.5,
        "scalars": [
            ["loss", 0.6931471805599453],
            ["reward_mean", 0.0],
            ["rewards/accuracy/mean", 0.1],
            ["lr", 1e-06],
        ],
    },
    {
        "step": 2,
        "wall_time": 1700000002.75,
        "scalars": [
            ["loss", -1.5],
            ["kl", 5.1e-05],
            ["tokens_per_s", 123456.789],
            ["rewards/pr\u00e9cision", 1.0],
        ],
    },
    {
        "step": 300,
        "wall_time": 1700000300.125,
        "scalars": [["eval/" + "held_out_accuracy_" * 8, 0.875]],
    },
    {
        "step": 2**33 + 5,
        "wall_time": 1700009999.0625,
        "scalars": [["loss", 3.4e38], ["grad_norm", 1e-30]],
    },
]
FIXTURE_NAME = "events.out.tfevents.%010d.%s.%s.%s" % (FILE_VERSION_WALL_TIME, "fixture", 4242, 0)


def make_fixture():
    import google.protobuf
    import tensorboard
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    os.makedirs(FIXTURE_DIR, exist_ok=True)
    for name in os.listdir(FIXTURE_DIR):
        if "tfevents" in name:
            os.remove(os.path.join(FIXTURE_DIR, name))
    path = os.path.join(FIXTURE_DIR, FIXTURE_NAME)
    with open(path, "wb") as f:
        w = RecordWriter(f)
        w.write(
            event_pb2.Event(
                wall_time=FILE_VERSION_WALL_TIME, file_version="brain.Event:2"
            ).SerializeToString()
        )
        for e in EVENTS:
            summary = summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag=tag, simple_value=v)
                    for tag, v in e["scalars"]
                ]
            )
            w.write(
                event_pb2.Event(
                    wall_time=e["wall_time"], step=e["step"], summary=summary
                ).SerializeToString()
            )
        w.flush()
    spec = {
        "about": "Written by tools/check_tensorboard.py --make-fixture with TensorBoard's "
        "event_pb2/summary_pb2 and RecordWriter; src/train/tensorboard.rs must write the "
        "same bytes for these events.",
        "written_by": "tensorboard %s, protobuf %s"
        % (tensorboard.__version__, google.protobuf.__version__),
        "file": FIXTURE_NAME,
        "file_version_wall_time": FILE_VERSION_WALL_TIME,
        "events": EVENTS,
    }
    with open(os.path.join(FIXTURE_DIR, "scalars.json"), "w") as f:
        json.dump(spec, f, indent=1, ensure_ascii=False)
        f.write("\n")

    # Read it back with TensorBoard's reader: the fixture must be what it says.
    got = read_scalars(FIXTURE_DIR)
    want = {}
    for e in EVENTS:
        for tag, v in e["scalars"]:
            want.setdefault(tag, []).append((e["step"], f32(v)))
    assert {t: [(s, v) for s, v, _ in xs] for t, xs in got.items()} == want, (got, want)
    print("wrote %s (%d bytes) and scalars.json" % (path, os.path.getsize(path)))


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def read_scalars(logdir):
    """{tag: [(step, value, wall_time)]} as TensorBoard reads the event files of logdir."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(
        logdir, size_guidance={ea.SCALARS: 0}, purge_orphaned_data=False
    )
    acc.Reload()
    return {
        tag: [(s.step, s.value, s.wall_time) for s in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def flatten(prefix, v, out):
    # bool is an int in Python; JSON's true/false are not metrics.
    if isinstance(v, bool):
        return
    if isinstance(v, (int, float)):
        x = f32(float(v)) if abs(float(v)) <= 3.4028234663852886e38 else math.inf
        if math.isfinite(x):
            out[prefix] = x
    elif isinstance(v, dict):
        for k, x in v.items():
            flatten(prefix + "/" + k if prefix else k, x, out)


def check(run_dir):
    logdir = os.path.join(run_dir, "tensorboard")
    files = sorted(n for n in os.listdir(logdir) if "tfevents" in n)
    if not files:
        sys.exit("%s: no event files" % logdir)
    want = {}  # (tag, step) -> value
    records = 0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            records += 1
            flat = {}
            flatten("", {k: v for k, v in rec.items() if k != "step"}, flat)
            for tag, x in flat.items():
                want[(tag, rec["step"])] = x
    got = read_scalars(logdir)
    problems = []
    seen = {}
    for tag, xs in got.items():
        for step, value, _ in xs:
            if (tag, step) in seen:
                problems.append("%s at step %d: written twice" % (tag, step))
            seen[(tag, step)] = value
    for key, x in sorted(want.items()):
        if key not in seen:
            problems.append("%s at step %d: in metrics.jsonl, not in the event files" % key)
        elif seen[key] != x:
            problems.append(
                "%s at step %d: metrics.jsonl %r (f32 %r), event file %r"
                % (key[0], key[1], x, f32(x), seen[key])
            )
    for key in sorted(set(seen) - set(want)):
        problems.append("%s at step %d: in the event files, not in metrics.jsonl" % key)

    steps = sorted({s for _, s in want})
    print("event files: %d in %s" % (len(files), logdir))
    for n in files:
        print("  %s (%d bytes)" % (n, os.path.getsize(os.path.join(logdir, n))))
    print(
        "metrics.jsonl: %d records, steps %s..%s"
        % (records, steps[0] if steps else "-", steps[-1] if steps else "-")
    )
    print("tags (%d): %s" % (len(got), ", ".join(sorted(got))))
    print(
        "scalars: %d in metrics.jsonl, %d read back by EventAccumulator, %d equal"
        % (len(want), len(seen), sum(1 for k, x in want.items() if seen.get(k) == x))
    )
    if problems:
        for p in problems[:20]:
            print("MISMATCH: " + p)
        if len(problems) > 20:
            print("... and %d more" % (len(problems) - 20))
        sys.exit(1)
    print("OK: every scalar equals metrics.jsonl at its step")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--make-fixture", action="store_true")
    g.add_argument("--check", metavar="RUN_DIR")
    a = p.parse_args()
    if a.make_fixture:
        make_fixture()
    else:
        check(a.check)


if __name__ == "__main__":
    main()

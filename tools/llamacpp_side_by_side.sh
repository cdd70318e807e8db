#!/usr/bin/env bash
# llama.cpp and medvlm side by side at Qwen2-VL-2B's shape (or a second shape, SHAPE below), random
# weights, on this CPU, with the same threads, pinned to the same cores, alternating engines in one
# run.
#
#   tools/llamacpp_side_by_side.sh --out DIR [--reps N] [--decode-rounds N] [--engines llama,medvlm]
#                                  [--prepare-only]
#
# What it does:
#  1. llama.cpp: reuses the build in $LLAMA_CPP_DIR/build (llama-bench, llama-mtmd-cli,
#     llama-quantize), or builds it there, offline, from the llama-cpp-python 0.3.36 sdist on
#     PyPI (its vendor/llama.cpp; cmake and ninja from PyPI wheels; -DGGML_NATIVE=ON, CPU
#     backend only, static). The compile runs under `nice -n 19`, 2 jobs.
#  2. Weights: `medvlm init --preset qwen2-vl-2b` writes a random bf16 checkpoint of
#     Qwen2-VL-2B-Instruct's shape (config.json as released). llama.cpp's convert_hf_to_gguf.py
#     turns that same checkpoint into a bf16 text GGUF and a vision (mmproj) GGUF;
#     llama-quantize makes Q8_0, Q4_1 and Q4_K_M from the bf16 file. bf16 -> GGUF bf16 is exact, so
#     llama.cpp's bf16 weights are the checkpoint's bit for bit.
#     The tokenizer: the converter refuses medvlm's own small BPE tokenizer (its pre-tokenizer
#     hash check). The helper gives the converter a view of the checkpoint (symlinked
#     shards) whose tokenizer.json has Qwen2's real vocabulary and merges, taken from
#     models/ggml-vocab-qwen2.gguf in the same llama.cpp tree, with the checkpoint's
#     Qwen2-VL special tokens; that passes the check unpatched, and the vocabulary stays
#     151,936 rows (config.json's vocab_size), so the LM head costs the same.
#     medvlm's `bench generate` builds its own random weights of the same shape (weight
#     values do not change the speed of either engine).
#  3. Per round (--reps, default 2), per precision: llama.cpp first, then medvlm.
#     llama.cpp: llama-bench -p 358 -n 64 -d 0,358 (prefill, and decode from an empty cache
#     and after 358 tokens, as medvlm decodes) under /usr/bin/time -v
#     (peak RSS), then llama-mtmd-cli with the mmproj on medvlm's 448x448 test card
#     (1,024 patches, 256 image tokens), given twice: the second "mtmd batch encoding done in
#     N ms" is the warm vision tower. medvlm: `medvlm bench generate --preset qwen2-vl-2b --group 1
#     --json` with --dtype for bf16/f32/f16 and --quantize for anything else; a variant the
#     binary does not accept is skipped and noted.
#  4. --decode-rounds N (default 0): then N rounds of decoding alone, per pair llama.cpp then
#     medvlm: llama-bench -p 0 -n 64 -d 358 -r 1 against the same medvlm bench run. This
#     machine's memory bandwidth moves by tens of percent between minutes, and both engines'
#     batch-1 decoding is bound by it, so one round's ratio says little; the median of many
#     short alternations says more (a second table: medians, range, rounds medvlm was ahead).
#     --reps 0 with it runs only these.
#  5. Prints a markdown table (also DIR/table.md; DIR/summary.json; raw outputs in DIR/raw/);
#     with --reps 2 or more, a summary per pair: the ratio of the engines' medians for decode,
#     prefill, vision tower and peak memory (above 1 = medvlm ahead) and the rounds ahead.
#
# Shapes (SHAPE):
#   qwen2-vl-2b       Qwen2-VL-2B-Instruct as released: its 151,936-row LM head is 15% of the text
#                     model's weights, which flatters whichever engine has the faster LM head.
#   qwen2-vl-2b-v50k  The same 28 layers and vision tower with GPT-2's vocabulary (50,257 tokens +
#                     the 14 Qwen2-VL special tokens, 50,304 rows): the LM head is 5.5% of the
#                     text weights, so the decoder layers decide. The checkpoint is the 2B one with
#                     its embedding cut to 50,304 rows (tools/llamacpp_side_by_side.py small-vocab),
#                     its tokenizer GPT-2's, from models/ggml-vocab-gpt-2.gguf of the llama.cpp
#                     tree; medvlm runs `bench generate --config` on the same config.json.
#
# Environment (defaults in brackets):
#   SHAPE            qwen2-vl-2b or qwen2-vl-2b-v50k  [qwen2-vl-2b]
#   LLAMA_CPP_DIR    llama.cpp cache: sdist, source, build/, models/  [~/.cache/medvlm-llamacpp]
#   LLCONV_VENV      venv for cmake, ninja and the converter (torch, transformers)  [/tmp/llconv]
#   MEDVLM           medvlm binary  [target/release/medvlm of this checkout]
#   LLAMA_VARIANTS   GGUF text types (llama-quantize names, lower case) ["bf16 q8_0 q4_1 q4_k_m"]
#   MEDVLM_VARIANTS  medvlm variants  ["bf16 f32 q8_0 q4_1 q4_k"]; a word NAME=ARG,ARG passes
#                    those arguments instead (e.g. q4=--quantize,q4_1,--dtype,f32); gguf-TYPE
#                    runs medvlm on llama.cpp's own TYPE file (one of LLAMA_VARIANTS, e.g.
#                    gguf-q4_k_m), imported once with `medvlm import-gguf` (exact: a Q4_K_M
#                    file keeps its Q4_K/Q6_K mix) and loaded with --model: the same weights,
#                    byte for byte, in both engines. Such a checkpoint loads in f32 (f16 mmproj
#                    weights held exactly), so its vision tower is f32's, not bf16's. The 2B
#                    shape only: import-gguf rebuilds Qwen2's tokenizer and refuses the 50k
#                    shape's GPT-2 one (there, NAME=--model,DIR on a `medvlm quantize` copy)
#   MMPROJ_TYPE      vision GGUF type  [f16]
#   THREADS [2]   CPUS (taskset list) [0,1]   PROMPT_TOKENS [358]   NEW_TOKENS [64]
#   LLAMA_BENCH_REPS (llama-bench -r)  [3]
#   DECODE_DEPTH     tokens in llama.cpp's cache before it decodes, besides an empty cache
#                    [358: what medvlm's bench decodes after, its prompt with the image's
#                    256 tokens; attention over them costs llama.cpp ~5% at Q4_K_M here]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
helper="$here/llamacpp_side_by_side.py"

SDIST_VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_CPP_DIR="${LLAMA_CPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/medvlm-llamacpp}"
LLCONV_VENV="${LLCONV_VENV:-/tmp/llconv}"
MEDVLM="${MEDVLM:-$repo/target/release/medvlm}"
SHAPE="${SHAPE:-qwen2-vl-2b}"
case "$SHAPE" in
  qwen2-vl-2b|qwen2-vl-2b-v50k) ;;
  *) echo "SHAPE=$SHAPE: expected qwen2-vl-2b or qwen2-vl-2b-v50k" >&2; exit 2 ;;
esac
LLAMA_VARIANTS="${LLAMA_VARIANTS:-bf16 q8_0 q4_1 q4_k_m}"
MEDVLM_VARIANTS="${MEDVLM_VARIANTS:-bf16 f32 q8_0 q4_1 q4_k}"
MMPROJ_TYPE="${MMPROJ_TYPE:-f16}"
THREADS="${THREADS:-2}"
CPUS="${CPUS:-0,1}"
PROMPT_TOKENS="${PROMPT_TOKENS:-358}"
NEW_TOKENS="${NEW_TOKENS:-64}"
LLAMA_BENCH_REPS="${LLAMA_BENCH_REPS:-3}"
DECODE_DEPTH="${DECODE_DEPTH:-358}"

out="" reps=2 decode_rounds=0 engines="llama,medvlm" prepare_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --decode-rounds) decode_rounds="$2"; shift 2 ;;
    --engines) engines="$2"; shift 2 ;;
    --prepare-only) prepare_only=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || [ "$prepare_only" = 1 ] || { echo "--out DIR is required" >&2; exit 2; }
for n in "$reps" "$decode_rounds"; do
  [[ "$n" =~ ^[0-9]+$ ]] || { echo "--reps/--decode-rounds: $n is not a whole number" >&2; exit 2; }
done
want() { case ",$engines," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

src="$LLAMA_CPP_DIR/llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp"
bin="$LLAMA_CPP_DIR/build/bin"
models="$LLAMA_CPP_DIR/models"
base_ckpt="$models/hf-qwen2-vl-2b"
ckpt="$models/hf-$SHAPE"
stage="$models/stage-$SHAPE"
mmproj="$models/mmproj-$SHAPE-$MMPROJ_TYPE.gguf"
gguf() { echo "$models/$SHAPE-$1.gguf"; }
if [ "$SHAPE" = qwen2-vl-2b ]; then
  vocab_gguf="$src/models/ggml-vocab-qwen2.gguf" shape_args="--preset qwen2-vl-2b"
  shape_label="Qwen2-VL-2B shape, random weights"
else
  vocab_gguf="$src/models/ggml-vocab-gpt-2.gguf" shape_args="--config $ckpt/config.json"
  shape_label="Qwen2-VL-2B layers, 50,304-token vocabulary, random weights"
fi

# ------------------------------------------------------------------ python venv (build + convert)
venv_has() { [ -x "$LLCONV_VENV/bin/python" ] && "$LLCONV_VENV/bin/python" -c "$1" 2>/dev/null; }
ensure_venv() {  # $1: python import check, $2...: pip requirements
  local check="$1"; shift
  venv_has "$check" && return 0
  [ -x "$LLCONV_VENV/bin/python" ] || python3 -m venv "$LLCONV_VENV"
  log "pip install $* into $LLCONV_VENV"
  (cd /tmp && nice -n 19 "$LLCONV_VENV/bin/pip" install -q "$@")
}

# ------------------------------------------------------------------ llama.cpp build
ensure_build() {
  if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-mtmd-cli" ] && [ -x "$bin/llama-quantize" ]; then
    return 0
  fi
  mkdir -p "$LLAMA_CPP_DIR"
  local tarball="$LLAMA_CPP_DIR/llama_cpp_python-$SDIST_VERSION.tar.gz"
  if [ ! -d "$src" ]; then
    ensure_venv 'import sys' pip
    if [ ! -f "$tarball" ]; then
      # --no-binary for this one package only: with :all: pip would build cmake from source.
      log "downloading the llama-cpp-python $SDIST_VERSION sdist"
      (cd /tmp && "$LLCONV_VENV/bin/pip" download "llama-cpp-python==$SDIST_VERSION" --no-deps \
         --no-binary llama-cpp-python -d "$LLAMA_CPP_DIR")
    fi
    echo "$SDIST_SHA256  $tarball" | sha256sum -c - >&2
    tar xzf "$tarball" -C "$LLAMA_CPP_DIR"
  fi
  ensure_venv 'import cmake, ninja' cmake ninja
  local PATH="$LLCONV_VENV/bin:$PATH"
  log "building llama.cpp in $LLAMA_CPP_DIR/build (nice -n 19, 2 jobs; 15-30 minutes on 2 cores)"
  (unset SOURCE_DATE_EPOCH  # when set, ggml turns GGML_NATIVE off
   cmake -S "$src" -B "$LLAMA_CPP_DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
     -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
     -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF >&2
   nice -n 19 cmake --build "$LLAMA_CPP_DIR/build" -j 2 \
     --target llama-bench llama-mtmd-cli llama-quantize >&2)
}

# ------------------------------------------------------------------ GGUFs
ensure_models() {
  mkdir -p "$models"
  if [ ! -f "$base_ckpt/config.json" ]; then
    log "medvlm init --preset qwen2-vl-2b --out $base_ckpt (random bf16 weights, 4.4 GB)"
    rm -rf "$base_ckpt"
    "$MEDVLM" init --preset qwen2-vl-2b --out "$base_ckpt" >&2
  fi
  local need_convert=0
  [ -f "$(gguf bf16)" ] && [ -f "$mmproj" ] || need_convert=1
  if [ "$need_convert" = 1 ]; then
    ensure_venv 'import torch, transformers, numpy, sentencepiece, google.protobuf' \
      torch numpy sentencepiece 'transformers==4.57.6' 'protobuf>=4.21.0,<5.0.0'
    if [ ! -f "$ckpt/config.json" ]; then
      log "$ckpt: the 2B checkpoint with a 50,304-row vocabulary"
      nice -n 19 "$LLCONV_VENV/bin/python" "$helper" small-vocab --checkpoint "$base_ckpt" \
        --base-vocab 50257 --vocab-size 50304 --out "$ckpt" >&2
    fi
    PYTHONPATH="$src/gguf-py" "$LLCONV_VENV/bin/python" "$helper" tokenizer \
      --checkpoint "$ckpt" --vocab-gguf "$vocab_gguf" --out "$stage" >&2
  fi
  if [ ! -f "$(gguf bf16)" ]; then
    log "convert_hf_to_gguf.py -> $(gguf bf16)"
    nice -n 19 "$LLCONV_VENV/bin/python" "$src/convert_hf_to_gguf.py" "$stage" \
      --outtype bf16 --outfile "$(gguf bf16).part" >&2
    mv "$(gguf bf16).part" "$(gguf bf16)"
  fi
  if [ ! -f "$mmproj" ]; then
    log "convert_hf_to_gguf.py --mmproj -> $mmproj"
    nice -n 19 "$LLCONV_VENV/bin/python" "$src/convert_hf_to_gguf.py" "$stage" --mmproj \
      --outtype "$MMPROJ_TYPE" --outfile "$mmproj.part" >&2
    mv "$mmproj.part" "$mmproj"
  fi
  local q
  for q in $LLAMA_VARIANTS; do
    [ "$q" = bf16 ] || [ -f "$(gguf "$q")" ] && continue
    log "llama-quantize $(gguf bf16) -> $(gguf "$q")"
    nice -n 19 "$bin/llama-quantize" "$(gguf bf16)" "$(gguf "$q").part" "${q^^}" 2 >&2
    mv "$(gguf "$q").part" "$(gguf "$q")"
  done
}

if want llama || [ "$prepare_only" = 1 ]; then
  ensure_build
  ensure_models
fi
[ "$prepare_only" = 1 ] && { log "prepared: $bin, $models"; exit 0; }

# ------------------------------------------------------------------ pairing
# Which llama.cpp file and medvlm variant go side by side: the same name (q8_0 and Q8_0,
# q4_1 and Q4_1), else the same family (q4_k_m next to a medvlm q4_*), else a column alone.
prec_class() {
  case "${1%%=*}" in
    q8*) echo q8 ;; q4*) echo q4 ;; q5*) echo q5 ;; q6*) echo q6 ;; *) echo "${1%%=*}" ;;
  esac
}
declare -a pair_llama=() pair_medvlm=()
if want llama; then for q in $LLAMA_VARIANTS; do pair_llama+=("$q"); pair_medvlm+=(""); done; fi
add_medvlm() {
  local v="$1" name="${1%%=*}" i
  for i in "${!pair_llama[@]}"; do
    if [ "${pair_llama[$i]}" = "${name#gguf-}" ] && [ -z "${pair_medvlm[$i]}" ]; then pair_medvlm[$i]="$v"; return; fi
  done
  for i in "${!pair_llama[@]}"; do
    if [ -n "${pair_llama[$i]}" ] && [ -z "${pair_medvlm[$i]}" ] \
       && [ "$(prec_class "${pair_llama[$i]}")" = "$(prec_class "$name")" ] \
       && ! [[ " $MEDVLM_VARIANTS " == *" ${pair_llama[$i]} "* ]]; then
      pair_medvlm[$i]="$v"; return
    fi
  done
  pair_llama+=(""); pair_medvlm+=("$v")
}
if want medvlm; then for v in $MEDVLM_VARIANTS; do add_medvlm "$v"; done; fi

medvlm_args() {  # arguments of one medvlm variant
  local v="$1"
  case "$v" in
    *=*) local rest="${v#*=}"; echo "${rest//,/ }" ;;
    gguf-*) echo "--model $(imported "${v#gguf-}")" ;;
    f32|bf16|f16) echo "--dtype $v" ;;
    *) echo "--quantize $v" ;;
  esac
}

imported() { echo "$models/medvlm-$SHAPE-$1"; }  # llama.cpp's TYPE file as a medvlm checkpoint
ensure_imported() {  # $1: a gguf-TYPE variant
  local q="${1#gguf-}" dir; dir="$(imported "${1#gguf-}")"
  [ -f "$dir/config.json" ] && return 0
  [ -f "$(gguf "$q")" ] || { echo "$1: no $(gguf "$q") (add $q to LLAMA_VARIANTS)" >&2; exit 1; }
  log "medvlm import-gguf $(gguf "$q") -> $dir"
  rm -rf "$dir.part"
  "$MEDVLM" import-gguf --model "$(gguf "$q")" --mmproj "$mmproj" --out "$dir.part" >&2
  mv "$dir.part" "$dir"
}

# ------------------------------------------------------------------ run
mkdir -p "$out/raw"
out="$(cd "$out" && pwd)"
img="$out/raw/card448.png"
python3 "$helper" png --out "$img"
: > "$out/skipped.tsv"

if want medvlm; then
  [ "$SHAPE" = qwen2-vl-2b ] || [ -f "$ckpt/config.json" ] \
    || { echo "no $ckpt/config.json: run with --prepare-only first" >&2; exit 1; }
  [ -x "$MEDVLM" ] || { echo "no medvlm binary at $MEDVLM (cargo build --release, or set MEDVLM)" >&2; exit 1; }
  medvlm_help="$("$MEDVLM" bench generate --help 2>&1 || true)"
  for v in $MEDVLM_VARIANTS; do
    case "$v" in gguf-*) ensure_imported "$v" ;; esac
  done
fi

cpu_model="$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
cpu_family="$(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')"
cpu_modelno="$(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')"
# (`|| true`: a CPU with none of them, as an AVX2-only one, must not end the run under pipefail.)
cpu_flags="$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
  | { grep -x -E 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_tile' || true; } | tr '\n' ' ' | sed 's/ $//')"
llama_version="llama-cpp-python $SDIST_VERSION sdist"
if [ -f "$src/../../CHANGELOG.md" ]; then
  upstream="$(grep -m1 -o 'llama.cpp@[0-9a-f]*' "$src/../../CHANGELOG.md" || true)"
  [ -n "$upstream" ] && llama_version="$llama_version (ggml-org/${upstream})"
fi
medvlm_version="$( ( "$MEDVLM" --version 2>/dev/null || echo "medvlm ?" ) | head -1)"
# The checkout the binary lies in (its HEAD now, which may be newer than the build) and the
# binary's modification time.
medvlm_commit="$(git -C "$(dirname "$MEDVLM")" rev-parse --short HEAD 2>/dev/null || echo "?")"
medvlm_built="$(date -u -r "$MEDVLM" +%Y-%m-%dT%H:%MZ 2>/dev/null || echo "?")"

run_llama() {  # $1 variant, $2 round dir
  local q="$1" r="$2" m; m="$(gguf "$1")"
  log "llama.cpp $q: llama-bench"
  /usr/bin/time -v -o "$r/llama-$q-bench.time" taskset -c "$CPUS" "$bin/llama-bench" -m "$m" \
    -t "$THREADS" -p "$PROMPT_TOKENS" -n "$NEW_TOKENS" -d "0,$DECODE_DEPTH" -r "$LLAMA_BENCH_REPS" -o json \
    > "$r/llama-$q-bench.json" 2> "$r/llama-$q-bench.err" || log "llama-bench $q failed (see $r)"
  log "llama.cpp $q: llama-mtmd-cli (vision tower)"
  /usr/bin/time -v -o "$r/llama-$q-mtmd.time" taskset -c "$CPUS" "$bin/llama-mtmd-cli" -m "$m" \
    --mmproj "$mmproj" --image "$img,$img" -p "Describe the two images." \
    -t "$THREADS" -c 4096 -n 16 --temp 0 --seed 0 --no-warmup \
    > "$r/llama-$q-mtmd.log" 2>&1 || log "llama-mtmd-cli $q failed (see $r)"
}

run_medvlm() {  # $1 variant, $2 round dir
  local v="$1" r="$2" name="${1%%=*}" args
  grep -q "^$name"$'\t' "$out/skipped.tsv" && return 0
  args="$(medvlm_args "$v")"
  if [[ "$args" == *--quantize* ]] && ! grep -q -- '--quantize' <<<"$medvlm_help"; then
    printf '%s\t%s\n' "$name" "this medvlm has no --quantize" >> "$out/skipped.tsv"
    log "medvlm $name: skipped (no --quantize in this binary)"
    return 0
  fi
  # A checkpoint of its own (--model) brings its shape.
  local shape="$shape_args"
  [[ " $args " == *" --model "* ]] && shape=""
  log "medvlm $name: bench generate $args"
  # shellcheck disable=SC2086
  if ! /usr/bin/time -v -o "$r/medvlm-$name.time" taskset -c "$CPUS" "$MEDVLM" bench generate \
      $shape --group 1 --new-tokens "$NEW_TOKENS" --threads "$THREADS" --json $args \
      > "$r/medvlm-$name.json" 2> "$r/medvlm-$name.err"; then
    if grep -q -E "unexpected argument|invalid value|not supported|unsupported" "$r/medvlm-$name.err"; then
      printf '%s\t%s\n' "$name" "$(grep -m1 -E 'error|Error' "$r/medvlm-$name.err" | tr '\t' ' ')" \
        >> "$out/skipped.tsv"
      log "medvlm $name: skipped (the binary rejects $args)"
    else
      log "medvlm $name failed (see $r/medvlm-$name.err)"
    fi
  fi
}

pairs_json=""
for i in "${!pair_llama[@]}"; do
  l="${pair_llama[$i]}" mv="${pair_medvlm[$i]%%=*}"
  pairs_json+="${pairs_json:+,}{\"llama\":\"$l\",\"llama_label\":\"${l^^}\",\"medvlm\":\"$mv\"}"
done
cat > "$out/meta.json" <<JSON
{"shape": "$shape_label", "cpu": "$cpu_model (family $cpu_family, model $cpu_modelno; $cpu_flags)", "threads": $THREADS, "cpus": "$CPUS",
 "llama_version": "$llama_version", "medvlm_version": "$medvlm_version (checkout $medvlm_commit, binary of $medvlm_built)",
 "date": "$(date -u +%Y-%m-%dT%H:%MZ)", "llama_prompt_tokens": $PROMPT_TOKENS,
 "llama_new_tokens": $NEW_TOKENS, "llama_bench_reps": $LLAMA_BENCH_REPS, "decode_depth": $DECODE_DEPTH,
 "mmproj": "$MMPROJ_TYPE", "decode_rounds": $decode_rounds, "pairs": [$pairs_json]}
JSON

for ((rep = 1; rep <= reps; rep++)); do
  r="$out/raw/rep$rep"; mkdir -p "$r"
  for i in "${!pair_llama[@]}"; do
    if [ -n "${pair_llama[$i]}" ]; then run_llama "${pair_llama[$i]}" "$r"; fi
    if [ -n "${pair_medvlm[$i]}" ]; then run_medvlm "${pair_medvlm[$i]}" "$r"; fi
  done
done

# Decoding alone, alternating engines per pair, many short rounds (step 4 of the header).
run_llama_decode() {  # $1 variant, $2 round dir
  local q="$1" r="$2"
  log "llama.cpp $q: llama-bench decode after $DECODE_DEPTH"
  /usr/bin/time -v -o "$r/llama-$q-decode.time" taskset -c "$CPUS" "$bin/llama-bench" -m "$(gguf "$q")" \
    -t "$THREADS" -p 0 -n "$NEW_TOKENS" -d "$DECODE_DEPTH" -r 1 -o json \
    > "$r/llama-$q-decode.json" 2> "$r/llama-$q-decode.err" || log "llama-bench $q failed (see $r)"
}
for ((k = 1; k <= decode_rounds; k++)); do
  r="$out/raw/decode$k"; mkdir -p "$r"
  for i in "${!pair_llama[@]}"; do
    [ -n "${pair_llama[$i]}" ] && [ -n "${pair_medvlm[$i]}" ] || continue
    run_llama_decode "${pair_llama[$i]}" "$r"
    run_medvlm "${pair_medvlm[$i]}" "$r"
  done
done

python3 "$helper" table --out "$out"

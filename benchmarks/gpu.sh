#!/usr/bin/env bash
# The GPU benchmark suite in one command: every benchmark in its CUDA configuration, then one ratio table.
#
#   bash benchmarks/gpu.sh [OUT_DIR]            # on a machine with one CUDA GPU (estimate: ~15 minutes on an H100)
#   SMOKE=1 bash benchmarks/gpu.sh [OUT_DIR]    # the same steps at toy size on the CPU (checks the script, ~1 min)
#
# Environment:
#   PRECISION=bf16|tf32|fp32  one precision for every arm of every benchmark (default bf16: torch.autocast(bf16)
#                             around the forward + loss of cachebrew, TextBrewer and the Trainer alike, TF32 on);
#                             see benchmarks/suite_timing.py
#   GPU_SUITE_ONLY="a b"      run only these steps (setup and ratios always run): distill_logits distill_hidden
#                             export reader; e.g. to split the suite over two shorter runs
#   GPU_SUITE_FAIL="a b"      make these steps fail on purpose (tests that a failure does not stop the others)
#   DEVICE_WHEELS=DIR         where the wheels a GPU machine lacks are (else .whl, shared/device-wheels,
#                             ../shared/device-wheels); SITE=DIR where they are installed (/tmp/cachebrew-site)
#
# Setup installs what is missing and nothing else (on a machine where everything imports it installs nothing):
# datasets / zstandard / textbrewer from the wheel folder, with the install line of its README
# (pip --no-index --no-deps --target $SITE, then $SITE on PYTHONPATH); `pip install -e .[hf]` if cachebrew,
# transformers or accelerate still does not import.
# Each step runs on its own: its output goes to OUT_DIR/logs/STEP.log (the tail is printed when it fails), a
# failure is recorded and the next step runs; a summary lists every step's status, and the exit status is 1
# if any step failed, after all of them ran. Each step's JSON is deleted before it runs, so the table never
# shows a figure from an earlier run.
# Configurations (issue 14, issue 30): BERT-base teacher (12 x 768) -> 3-layer student, batch 64, seq 128;
#   distill: logits only, and logits + 4 hidden_mse matches; ceiling, cache, cache_mem, online, TextBrewer, and the
#   hf Trainer from the cache and online; 500 timed steps per arm after 20 warm-up steps, CUDA events; 3 rounds;
#   export: logits only, logits + 4 hidden layers, and a GPT-2 twin with 16 sampled logit slots, vs the bare
#   forward; 65,536 rows (16,384 for the hidden states: ~786 KB per row, 13 GB of shards); reader: 0, 2, 4 workers.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results-gpu}
LOGS=$OUT/logs
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=$(command -v python3 || command -v python)
SITE=${SITE:-/tmp/cachebrew-site}
PRECISION=${PRECISION:-bf16}
ONLY=${GPU_SUITE_ONLY:-} FAIL=${GPU_SUITE_FAIL:-}
ONLY=" ${ONLY//,/ } " FAIL=" ${FAIL//,/ } "

missing() {  # the modules among "$@" that cannot be found (find_spec: nothing is imported, so it is quick)
    "$PY" -c "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))" "$@"
}

setup() {  # runs in this shell (not a subshell), so the PYTHONPATH it exports reaches every later step
    local lacking dir wheels=
    [[ -d $SITE ]] && export PYTHONPATH="$SITE:$PYTHONPATH"  # installed by an earlier run on this machine
    lacking=$(missing datasets zstandard textbrewer) || return 1
    if [[ -n $lacking ]]; then
        for dir in ${DEVICE_WHEELS:-} .whl shared/device-wheels ../shared/device-wheels; do
            if compgen -G "$dir/*.whl" >/dev/null; then wheels=$dir; break; fi
        done
        if [[ -z $wheels ]]; then
            echo "missing $lacking, and no wheel folder (DEVICE_WHEELS, .whl, shared/device-wheels, ../shared/device-wheels)"
        else  # the install line of ../shared/device-wheels/README.md
            echo "missing $lacking: installing $wheels/*.whl into $SITE"
            "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$wheels"/*.whl || return 1
            [[ ":$PYTHONPATH:" == *":$SITE:"* ]] || export PYTHONPATH="$SITE:$PYTHONPATH"
        fi
    else
        echo "datasets, zstandard, textbrewer: importable, nothing to install"
    fi
    if ! report; then
        echo "so: pip install -e .[hf]"
        # bounded: a machine without a network fails in seconds rather than retrying for minutes
        "$PY" -m pip install -q --retries 1 --timeout 15 -e ".[hf]" || return 1
        report || return 1
    fi
}

report() {  # imports cachebrew (and torch); prints the versions; fails if anything the suite needs is missing
    "$PY" -c "
import importlib.util, sys
from importlib.metadata import version
import torch, cachebrew
lacking = [m for m in ('transformers', 'accelerate', 'datasets', 'zstandard', 'textbrewer', 'pyarrow')
           if importlib.util.find_spec(m) is None]
if lacking:
    sys.exit('not importable: ' + ' '.join(lacking))
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, cachebrew {cachebrew.__version__}, ' + ', '.join(
    f'{m} {version(m)}' for m in ('transformers', 'accelerate', 'datasets', 'textbrewer', 'pyarrow')) +
    f', device {torch.cuda.get_device_name() if torch.cuda.is_available() else \"CPU\"}')"
}

fail_on_purpose() {
    "$PY" -c "raise RuntimeError('GPU_SUITE_FAIL names this step: it fails on purpose')"
}

NAMES=() STATUS=() SECS=()
run_step() {  # run_step NAME JSON|- COMMAND...: its own log; a failure is recorded and printed, never fatal
    local name=$1 json=$2 rc=0 t0=$SECONDS
    shift 2
    [[ $json != - ]] && rm -f "$json"
    [[ $FAIL == *" $name "* ]] && set -- fail_on_purpose
    echo "== $name: $*"
    "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
    NAMES+=("$name") SECS+=($((SECONDS - t0)))
    if [[ $name == ratios && $rc == 3 ]]; then  # ratio_table.py: the table is there, some figures are not
        STATUS+=("INCOMPLETE")
        echo "-- $name: the table lacks figures (MISSING in it)"
    elif ((rc)); then
        STATUS+=("FAILED (exit $rc)")
        echo "-- $name FAILED (exit $rc) after $((SECONDS - t0)) s; the end of $LOGS/$name.log:"
        tail -n 40 "$LOGS/$name.log" | sed 's/^/   | /'
    else
        STATUS+=(passed)
        echo "-- $name passed in $((SECONDS - t0)) s"
    fi
}
selected() { [[ $ONLY == "  " || $ONLY == *" $1 "* ]]; }

run_step setup - setup
if [[ "${SMOKE:-0}" == 1 ]]; then
    # toy sizes; one torch thread per process: on a shared 2-core machine two OpenMP threads per process spin
    # against the other processes and a toy step takes a second instead of 20 ms
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    DEV=cpu; D=(--toy --steps 2 --warmup 1 --repeats 1 --batch 8 --seq 32 --examples 32 --workers 1)
    E=(--toy --examples 32 --hidden-examples 16 --batch 8 --seq 32 --repeats 1)
    R=(--sizes --hidden-rows 300 --workers 0 1 --rounds 1)  # --sizes (none): the hidden cache only
else
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "benchmarks/gpu.sh: torch sees no CUDA device (SMOKE=1 runs the suite at toy size on the CPU)" >&2
        exit 2
    fi
    DEV=cuda; D=(--steps 500 --warmup 20 --repeats 3 --batch 64 --seq 128 --examples 2048 --workers 2)
    E=(--examples 65536 --hidden-examples 16384 --batch 64 --seq 128 --repeats 3)
    R=(--sizes 100000 --hidden-rows 20000 --workers 0 2 4 --rounds 2)
fi
echo "precision: $PRECISION on every arm of every benchmark; device $DEV; results in $OUT"

EXPECT=()
for config in logits hidden; do
    if selected "distill_$config"; then
        EXPECT+=("distill_$config")
        run_step "distill_$config" "$OUT/distill_$config.json" "$PY" benchmarks/distill_throughput.py --device "$DEV" \
            --config "$config" --trainer --require-textbrewer --precision "$PRECISION" "${D[@]}" \
            --json "$OUT/distill_$config.json"
    fi
done
if selected export; then
    EXPECT+=(export)
    run_step export "$OUT/export.json" "$PY" benchmarks/export_throughput.py --device "$DEV" --precision "$PRECISION" \
        "${E[@]}" --configs "logits only" "logits + 4 hidden" "causal LM, sampled 16" --json "$OUT/export.json"
fi
if selected reader; then
    EXPECT+=(reader)
    run_step reader "$OUT/reader.json" "$PY" benchmarks/reader.py "${R[@]}" --json "$OUT/reader.json"
fi
run_step ratios "$OUT/ratios.md" "$PY" benchmarks/ratio_table.py "$OUT" --expect "${EXPECT[@]}" \
    --markdown "$OUT/ratios.md"

echo
echo "== summary ($OUT/logs/STEP.log for each step's output)"
failed=0
for i in "${!NAMES[@]}"; do
    printf '   %-16s %-18s %5d s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
    [[ ${STATUS[$i]} == passed ]] || failed=$((failed + 1))
done
if [[ -f $OUT/ratios.md ]]; then
    echo
    cat "$OUT/ratios.md"
fi
if ((failed)); then
    echo "benchmarks/gpu.sh: $failed step(s) failed or incomplete (the figures above are from the steps that passed)" >&2
    exit 1
fi

#!/usr/bin/env bash
# fleetbench's one entry point for people and CI. Each command installs what it needs first.
#
#   scripts/dev.sh quickstart   build, then run the main job: a coordinator on SQLite, two local agents,
#                               the bundled digits model and its variants, a ranking printed at the end
#   scripts/dev.sh test         build, make sure PostgreSQL is reachable, run the whole test suite
#   scripts/dev.sh setup        only the Python side: .venv with onnxruntime==1.31.1 (its CPU library is what
#                               the agents load) and the packages the model scripts use
#   scripts/dev.sh env          print the environment lines the other commands use (eval "$(scripts/dev.sh env)")
#
# Environment: FLEETBENCH_TEST_POSTGRES_URL points the Postgres tests at your server
# (default postgres://postgres@127.0.0.1:5432/postgres); PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}

log() { printf '[dev.sh] %s\n' "$*" >&2; }

setup_python() {
    if [ ! -x .venv/bin/python ]; then
        log "creating .venv"
        if ! "$PYTHON" -m venv .venv >/dev/null 2>&1; then
            rm -rf .venv
            # No venv module (e.g. Debian without python3-venv): install into .venv with pip --target.
            log "python venv unavailable; installing with pip --target"
            site=".venv/lib/python$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages"
            mkdir -p "$site"
            "$PYTHON" -m pip install -q --disable-pip-version-check --target "$site" -r requirements.txt
            mkdir -p .venv/bin
            printf '#!/usr/bin/env bash\nPYTHONPATH="%s/%s${PYTHONPATH:+:$PYTHONPATH}" exec %s "$@"\n' "$ROOT" "$site" "$(command -v "$PYTHON")" > .venv/bin/python
            chmod +x .venv/bin/python
            cp requirements.txt .venv/.requirements
            return
        fi
    fi
    if ! cmp -s requirements.txt .venv/.requirements; then
        log "installing Python requirements (onnxruntime==1.31.1, numpy, onnx, scikit-learn) into .venv"
        .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
        cp requirements.txt .venv/.requirements
    fi
}

ort_lib() {
    local lib
    lib=$(ls "$ROOT"/.venv/lib/python*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n 1)
    if [ -z "$lib" ]; then
        log "onnxruntime's library is missing from .venv; remove .venv and run again"
        exit 1
    fi
    printf '%s\n' "$lib"
}

setup() {
    setup_python
    if [ ! -f models/conv/squeezenet.onnx ] || [ ! -f models/conv/shufflenet.onnx ]; then
        log "materialising the convolutional test models (models/make_conv_models.py)"
        .venv/bin/python models/make_conv_models.py >&2
    fi
    ORT_DYLIB_PATH=$(ort_lib)
    export ORT_DYLIB_PATH
    export FLEETBENCH_PYTHON="$ROOT/.venv/bin/python"
}

build() {
    log "building (release)"
    cargo build --release --workspace --bins --locked
}

cmd=${1:-}
shift || true
case "$cmd" in
    setup)
        setup
        log "ORT_DYLIB_PATH=$ORT_DYLIB_PATH"
        ;;
    env)
        setup
        printf 'export ORT_DYLIB_PATH=%q\nexport FLEETBENCH_PYTHON=%q\n' "$ORT_DYLIB_PATH" "$FLEETBENCH_PYTHON"
        ;;
    quickstart)
        setup
        build
        exec "$ROOT/target/release/fleetbench" quickstart "$@"
        ;;
    test)
        setup
        build
        scripts/ensure-postgres.sh
        scripts/ensure-prometheus.sh
        scripts/ensure-browser.sh
        log "running the test suite"
        cargo test --release --workspace --locked -- "$@"
        ;;
    *)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac

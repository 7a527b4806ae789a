#!/usr/bin/env bash
# Install pi_axera_sd_service into ./.venv (idempotent).
#
#   scripts/install.sh            create .venv if missing, pip install -e '.[onnx,dev]'
#   scripts/install.sh --force    reinstall even when nothing changed
#
# Skips pip when .venv already holds this checkout and pyproject.toml is unchanged (stamp file).
# Environment: PYTHON (interpreter to create the venv with, >= 3.10), EXTRAS (default "onnx,dev").
# The NPU runtime (pyaxengine wheel) is installed separately: see RASPBERRY_PI_SETUP.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv"
EXTRAS="${EXTRAS:-onnx,dev}"
STAMP="$VENV/.pi_axera_sd_install_stamp"
FORCE=0

say() { printf 'install.sh: %s\n' "$*" >&2; }

for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        -h | --help) sed -n '2,9s/^# \{0,1\}//p' "$ROOT/scripts/install.sh"; exit 0 ;;
        *) say "unknown argument: $arg (usage: scripts/install.sh [--force])"; exit 2 ;;
    esac
done

pick_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11 python3.10; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [[ ! -x "$VENV/bin/python" ]]; then
    if ! PY="$(pick_python)"; then
        say "need Python >= 3.10 (on Debian / Raspberry Pi OS: sudo apt install python3 python3-venv)"
        exit 1
    fi
    say "creating .venv with $PY ($("$PY" -c 'import platform; print(platform.python_version())'))"
    if ! "$PY" -m venv "$VENV"; then
        rm -rf "$VENV"
        say "python -m venv failed (on Debian / Raspberry Pi OS: sudo apt install python3-venv)"
        exit 1
    fi
fi

want="$("$VENV/bin/python" - "$EXTRAS" <<'PY'
import hashlib, pathlib, sys
digest = hashlib.sha256(pathlib.Path("pyproject.toml").read_bytes()).hexdigest()
print(f"{digest} {sys.argv[1]} {pathlib.Path.cwd()} {sys.version.split()[0]}")
PY
)"
if [[ $FORCE == 0 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] &&
    "$VENV/bin/python" -c 'import pi_axera_sd_service' 2>/dev/null; then
    say "up to date (.venv, extras [$EXTRAS]); --force to reinstall"
    exit 0
fi

say "pip install -e '.[$EXTRAS]' (a first install downloads the dependencies: about a minute)"
rm -f "$STAMP"
# pip's own lines, one per package, as progress; its errors (stderr) pass through unfiltered
"$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -e ".[$EXTRAS]" |
    while IFS= read -r line; do
        case "$line" in
            Collecting* | "Installing collected packages"* | Successfully*) say "pip: $line" ;;
        esac
    done
printf '%s\n' "$want" >"$STAMP"
say "done: $VENV/bin/pi-axera-sd --help"

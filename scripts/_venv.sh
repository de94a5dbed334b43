# Sourced by scripts/*: create or refresh .venv and install gridq (with test extras) into it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.gridq-installed"
if [ ! -x "$venv/bin/python" ]; then
    echo "gridq: creating $venv" >&2
    python3 -m venv "$venv"
fi
# Reinstall only when the packaging metadata changed since the last install.
if [ ! -f "$stamp" ] || [ "$root/setup.cfg" -nt "$stamp" ]; then
    echo "gridq: installing gridq and its dependencies into .venv (log: .venv/install.log)" >&2
    if ! { "$venv/bin/python" -m pip install -q --upgrade pip &&
           "$venv/bin/python" -m pip install -q -e "$root[test]" --config-settings editable_mode=compat; } \
            >"$venv/install.log" 2>&1; then
        cat "$venv/install.log" >&2
        echo "gridq: installing into .venv failed (above)" >&2
        exit 1
    fi
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"

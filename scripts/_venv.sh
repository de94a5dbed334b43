# Sourced by scripts/*: create or refresh .venv and install gridq (with test extras) into it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.gridq-installed"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# Reinstall only when the packaging metadata changed since the last install.
if [ ! -f "$stamp" ] || [ "$root/setup.cfg" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -q -e "$root[test]" --config-settings editable_mode=compat
    touch "$stamp"
fi
export PATH="$venv/bin:$PATH"

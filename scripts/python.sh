# Sourced by scripts/demo and scripts/test: sets PY to the Python that fetch is installed
# into and run with.
#
# That is python3 itself (or $PYTHON), unless it is the system's own Python that refuses
# pip installs (PEP 668: Debian 12, Ubuntu 23.04 and later) or has no pip: then a virtual
# environment in .venv, made once and reused. As root on Debian/Ubuntu a missing
# python3-venv is installed with apt-get (unless FETCH_NO_APT=1).

pick_python() {
    local py=${PYTHON:-python3}
    if ! command -v "$py" >/dev/null 2>&1; then
        echo "$py not found: fetch needs Python 3.11 or newer" >&2
        exit 1
    fi
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "fetch needs Python 3.11 or newer; $py is $("$py" --version 2>&1)" >&2
        exit 1
    fi
    if [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; then
        PY=.venv/bin/python
        return
    fi
    # pip's own test (a marker beside the standard library, outside a virtual environment)
    if "$py" - <<'PYCODE'
import os, sys, sysconfig
try:
    import pip  # noqa: F401
except ImportError:
    sys.exit(1)
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(1 if sys.prefix == sys.base_prefix and os.path.exists(marker) else 0)
PYCODE
    then
        PY=$py
        return
    fi
    echo "$py is the system's Python (its packages are the package manager's): using .venv"
    rm -rf .venv
    if ! "$py" -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ -z "${FETCH_NO_APT:-}" ]; then
            echo "installing: python3-venv"
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -qq
            apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
            "$py" -m venv .venv
        else
            echo "cannot make a virtual environment with $py: install python3-venv" \
                 "(Debian/Ubuntu), or set PYTHON to a Python 3.11+ that pip may install into" >&2
            exit 1
        fi
    fi
    PY=.venv/bin/python
}

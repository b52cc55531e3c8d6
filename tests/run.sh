#!/usr/bin/env bash
# Installs everything the test suite needs, then runs it (ruff, then pytest).
#   Debian packages: postfix (smtp-sink, smtp-source: real SMTP peers), swaks, testssl.sh.
#   Python packages: pymta itself (editable, compat mode so twistd sees the plugin) + test extras.
# Extra arguments go to pytest (e.g. tests/run.sh -k smuggling).
set -eu
cd "$(dirname "$0")/.."

need=()
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v testssl >/dev/null 2>&1 || need+=(testssl.sh)
[ -x /usr/sbin/smtp-sink ] && [ -x /usr/sbin/smtp-source ] || need+=(postfix)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" </dev/null
fi

PY="${PYTHON:-python3}"
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
"$PY" -m ruff check pymta tests twisted bench
exec "$PY" -m pytest -q -p no:cacheprovider tests "$@"

#!/usr/bin/env bash
# Installs everything the test suite needs, then runs it (ruff, mypy --strict, then pytest).
#   Debian packages: postfix (smtp-sink, smtp-source: real SMTP peers), swaks, testssl.sh, dovecot-lmtpd, mutt,
#   git-email, clamav-milter,
#   libfaketime (steps the wall clock of a real twistd),
#   libmail-dkim-perl and opendkim-tools (independent DKIM verifiers),
#   Debian packages: postfix (smtp-sink, smtp-source: real SMTP peers), swaks, testssl.sh, knot and
#   unbound (signed and validated DNS for the DANE tests),
#   python3-venv where the interpreter cannot make a virtual environment.
#   Python packages: pymta itself (editable, compat mode so twistd sees the plugin) + test extras,
#   into the active virtual environment, or else into ./.venv (made here): Debian 12 refuses a
#   pip install into the system Python.
# Extra arguments go to pytest (e.g. tests/run.sh -k smuggling).
set -eu
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"

need=()
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v testssl >/dev/null 2>&1 || need+=(testssl.sh)
command -v msmtp >/dev/null 2>&1 || need+=(msmtp)
[ -x /usr/sbin/smtp-sink ] && [ -x /usr/sbin/smtp-source ] || need+=(postfix)
compgen -G "/usr/lib/*/faketime/libfaketimeMT.so.1" >/dev/null || need+=(libfaketime)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# DANE tests: knot signs zones on loopback, unbound validates them (both started by the tests).
[ -x /usr/sbin/knotd ] || need+=(knot)
[ -x /usr/sbin/unbound ] || need+=(unbound)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ -x /usr/lib/dovecot/lmtp ] || need+=(dovecot-lmtpd)  # a real LMTP server (tests/test_lmtp.py)
command -v mutt >/dev/null 2>&1 || need+=(mutt)  # pymta-sendmail's callers (tests/test_sendmail.py)
[ -x /usr/lib/git-core/git-send-email ] || need+=(git-email)
[ -x /usr/sbin/clamav-milter ] && [ -x /usr/sbin/clamd ] || need+=(clamav-milter clamav-daemon)  # a real milter
in_venv=$("$PY" -c 'import sys; print(int(sys.prefix != sys.base_prefix))')
if [ "$in_venv" = 0 ] && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    need+=(python3-venv)
fi
perl -MMail::DKIM::Verifier -e 1 >/dev/null 2>&1 || need+=(libmail-dkim-perl)
command -v opendkim-testmsg >/dev/null 2>&1 || [ -x /usr/sbin/opendkim-testmsg ] || need+=(opendkim-tools)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" </dev/null
fi

if [ "$in_venv" = 0 ]; then
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    PY=.venv/bin/python
fi

"$PY" -m pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
"$PY" -m ruff check pymta tests twisted bench
"$PY" -m mypy pymta  # strict (setup.cfg [mypy])
exec "$PY" -m pytest -q -rs -p no:cacheprovider tests "$@"

#!/usr/bin/env bash
# The test command of the README (and of .ci/run): installs everything the tests need, then
# runs lint, types and the suite twice: compiled extensions required, then pure Python.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -x tests/unit`).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}

# System packages, only when something is missing, so repeated runs stay fast.
missing=()
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
"$PY" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || missing+=(python3-dev)
"$PY" -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# Real peers for the interop tests: swaks, and Postfix for smtp-source / smtp-sink.
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
[ -x /usr/sbin/smtp-source ] || missing+=(postfix)
# Postfix's SASL client needs the PLAIN/LOGIN plug-ins (only a Recommends of libsasl2-2).
ls /usr/lib/*/sasl2/libplain.so* >/dev/null 2>&1 || missing+=(libsasl2-modules)
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}" >&2
  # Postfix is installed for its tools only: no configuration, no daemon started.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The test run needs the compiled modules: a failed build is an error here, not a fallback.
FERRY_REQUIRE_EXTENSIONS=1 .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/mypy

status=0
echo "== suite with compiled extensions (FERRY_REQUIRE_EXTENSIONS=1)"
FERRY_REQUIRE_EXTENSIONS=1 .venv/bin/python -m pytest -p no:cacheprovider "$@" || status=1
echo "== suite in pure Python (FERRY_NO_EXTENSIONS=1)"
FERRY_NO_EXTENSIONS=1 .venv/bin/python -m pytest -p no:cacheprovider "$@" || status=1
exit $status

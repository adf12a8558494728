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
# OpenSSL's headers and libcrypto.so for ext/pkey.pyx (DKIM's public-key operations).
[ -f /usr/include/openssl/evp.h ] || missing+=(libssl-dev)
"$PY" -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# Real peers for the interop tests: swaks, and Postfix for smtp-source / smtp-sink.
command -v swaks >/dev/null 2>&1 || missing+=(swaks)
# swaks's STARTTLS needs Net::SSLeay (only a Recommends of swaks, so --no-install-recommends
# leaves it out: swaks then exits 10 "TLS not available").
perl -MNet::SSLeay -e 1 >/dev/null 2>&1 || missing+=(libnet-ssleay-perl)
[ -x /usr/sbin/smtp-source ] || missing+=(postfix)
# nghttp2's h2load, the C HTTP load generator of benchmarks/bench_inject.py (the HTTP
# counterpart of smtp-source); no test needs it.
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
# systemd-analyze checks contrib/ferry.service (tests/e2e/test_service.py); nothing is
# started: installing the package in a container does not make systemd run.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# Postfix's SASL client needs the PLAIN/LOGIN plug-ins (only a Recommends of libsasl2-2).
ls /usr/lib/*/sasl2/libplain.so* >/dev/null 2>&1 || missing+=(libsasl2-modules)
# OpenDKIM's opendkim-testmsg verifies our DKIM signatures (tests/interop/test_opendkim.py,
# in namespaces made by util-linux's unshare: engine/testing/opendkim.py).
[ -x /usr/sbin/opendkim-testmsg ] || missing+=(opendkim-tools)
# The content scanners' daemons (tests/integration/test_scanners.py): the tests run their own
# rspamd and clamd (engine/testing/rspamd.py, clamav.py) on loopback with a configuration and
# a signature database of their own, so no service of these packages is used or needed.
command -v rspamd >/dev/null 2>&1 || missing+=(rspamd)
[ -x /usr/sbin/clamd ] || missing+=(clamav-daemon)
command -v clamscan >/dev/null 2>&1 || missing+=(clamav)
# Redis for the limits several nodes share (tests/integration/test_cluster_limits.py): the
# tests run their own redis-server on loopback (engine/testing/redis.py), never the service.
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# Exim, a second destination MTA: Debian's exim4 packages conflict with postfix (both provide
# mail-transport-agent), so its binary is unpacked into .cache/exim (dpkg -x: no maintainer
# scripts, nothing started) instead of installed; engine/testing/exim.py runs it from there.
EXIM_PKG=exim4-daemon-light
EXIM_BIN=.cache/exim/usr/sbin/exim4
if [ ${#missing[@]} -gt 0 ] || [ ! -x "$EXIM_BIN" ]; then
  apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${missing[*]}" >&2
  # Postfix is installed for its tools only: no configuration, no daemon started.
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  # clamav-daemon pulls in clamav-freshclam: no download daemon (the tests write their own
  # signatures).
  echo "clamav-freshclam clamav-freshclam/autoupdate_freshclam select manual" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ ! -x "$EXIM_BIN" ]; then
  echo "tests/run.sh: unpacking $EXIM_PKG into .cache/exim" >&2
  exim_tmp=$(mktemp -d)
  # apt's sandbox user cannot write to the private temporary directory: download as root.
  (cd "$exim_tmp" && apt-get download -qq -o APT::Sandbox::User=root "$EXIM_PKG")
  rm -rf .cache/exim && mkdir -p .cache
  dpkg -x "$exim_tmp"/"$EXIM_PKG"_*.deb "$exim_tmp/root"
  # The libraries it links with (the lib* names of its Depends), installed when missing.
  libs=()
  for dep in $(dpkg-deb -f "$exim_tmp"/"$EXIM_PKG"_*.deb Depends | tr ',|' '\n\n' \
               | sed -e 's/(.*)//' -e 's/[[:space:]]//g' | grep '^lib'); do
    dpkg-query -W -f='${Status}' "$dep" 2>/dev/null | grep -q 'install ok installed' || libs+=("$dep")
  done
  if [ ${#libs[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${libs[*]} for Exim" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${libs[@]}"
  fi
  mv "$exim_tmp/root" .cache/exim
  rm -rf "$exim_tmp"
fi
if ldd "$EXIM_BIN" | grep -q 'not found'; then
  echo "tests/run.sh: $EXIM_BIN misses libraries:" >&2; ldd "$EXIM_BIN" | grep 'not found' >&2; exit 1
fi
# Debian's Exim looks up its compiled-in user by name before it reads any configuration;
# the package's maintainer script would create it, so do what that script does.
getent passwd Debian-exim >/dev/null \
  || useradd --system --user-group --no-create-home --home-dir /var/spool/exim4 \
       --shell /usr/sbin/nologin Debian-exim

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# The editable install (it compiles ext/), skipped when this checkout's last one still holds:
# the same checkout path, pyproject.toml, setup.py and ext/ sources (a stamp in the venv),
# every compiled module importable, every installed requirement met (pip check, offline).
# A repeated run then asks no package index (pip's isolated build environment would, for
# setuptools and Cython, at every install) and compiles nothing.
stamp=.venv/ferry-install.stamp
sources=$({ pwd; cat pyproject.toml setup.py
            find ext -type f \( -name '*.pyx' -o -name '*.pxi' -o -name '*.pxd' \) | sort | xargs cat
          } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" = "$sources" ] \
   && FERRY_REQUIRE_EXTENSIONS=1 .venv/bin/python -c 'import importlib, engine._speedups as s
for m in s.SELECTORS.values(): importlib.import_module(m)' >/dev/null 2>&1 \
   && .venv/bin/python -m pip check -q >/dev/null 2>&1; then
  echo "tests/run.sh: the editable install is up to date ($stamp)" >&2
else
  rm -f "$stamp"
  # The test run needs the compiled modules: a failed build is an error here, not a fallback.
  FERRY_REQUIRE_EXTENSIONS=1 .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  echo "$sources" > "$stamp"
fi

# The RFC 7208 test suite that pyspf's source distribution ships (test/rfc7208-tests.yml),
# run by tests/integration/test_spf_suite.py: fetched here, never committed.
SPF_SUITE=.cache/pyspf/rfc7208-tests.yml
if [ ! -f "$SPF_SUITE" ]; then
  echo "tests/run.sh: fetching pyspf's sdist for $SPF_SUITE" >&2
  mkdir -p .cache/pyspf
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps \
    --no-binary :all: -d .cache/pyspf pyspf==2.0.14
  tar -xzf .cache/pyspf/pyspf-2.0.14.tar.gz -C .cache/pyspf --strip-components=2 --no-same-owner \
    pyspf-2.0.14/test/rfc7208-tests.yml pyspf-2.0.14/test/rfc7208-tests.LICENSE
fi

.venv/bin/ruff check .
.venv/bin/mypy

status=0
if [ "${FERRY_TEST_SERIAL:-0}" = 1 ]; then
  echo "== suite with compiled extensions (FERRY_REQUIRE_EXTENSIONS=1)"
  FERRY_REQUIRE_EXTENSIONS=1 .venv/bin/python -m pytest -p no:cacheprovider "$@" || status=1
  echo "== suite in pure Python (FERRY_NO_EXTENSIONS=1)"
  FERRY_NO_EXTENSIONS=1 .venv/bin/python -m pytest -p no:cacheprovider "$@" || status=1
  exit $status
fi
# The two runs at once (FERRY_TEST_SERIAL=1: one after the other): much of a run's time is
# spent waiting on real time (retries, expiries, daemons starting) with a core idle, so
# together they take little more than the longer one. They share nothing: every test binds
# port 0 or a port the kernel just gave out, and keeps its files under its own tmp_path.
# The pure-Python run's output goes to a file, printed when the compiled run has ended.
pure_log=$(mktemp)
trap 'rm -f "$pure_log"' EXIT
FERRY_NO_EXTENSIONS=1 .venv/bin/python -m pytest -p no:cacheprovider "$@" >"$pure_log" 2>&1 &
pure_pid=$!
echo "== suite with compiled extensions (FERRY_REQUIRE_EXTENSIONS=1)"
FERRY_REQUIRE_EXTENSIONS=1 .venv/bin/python -m pytest -p no:cacheprovider "$@" || status=1
wait "$pure_pid" || status=1
echo "== suite in pure Python (FERRY_NO_EXTENSIONS=1), run beside it"
cat "$pure_log"
exit $status

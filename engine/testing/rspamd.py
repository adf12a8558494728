"""A private rspamd on 127.0.0.1, for the rspamd agent's tests.

``RspamdInstance(directory)`` writes its own ``rspamd.conf`` (and a test rule file) under
``directory`` and runs Debian's ``/usr/bin/rspamd`` in the foreground with it: one normal
worker on 127.0.0.1:``port`` (an ephemeral port by default), no controller, no proxy, no
fuzzy storage, no Redis.  ``start()`` returns once ``/ping`` answers ``pong`` (rspamd
compiles its tables at start: allow seconds); ``stop()`` stops it by PID.

The configuration is a top-level file of its own rather than Debian's ``rspamd.conf`` with
``local.d`` overrides: it takes the stock symbols, groups, composites and Lua rules from
``/etc/rspamd`` and ``/usr/share/rspamd`` but includes no module configuration, so every Lua
plugin that would ask DNS lists, fetch maps from the internet or talk to Redis (rbl,
phishing, multimap, fuzzy_check, spf, dkim, dmarc, neural, ratelimit, greylist, ...) stays
unconfigured and rspamd disables it.  The resolver it is given is a closed port on loopback,
so any lookup a rule still tries fails at once instead of leaving the machine.

What the tests can make rspamd answer: GTUBE (rspamd's test patterns are enabled)
gives "reject", :data:`GTUBE_ADD_HEADER` "add header", :data:`GTUBE_REWRITE_SUBJECT`
"rewrite subject" (subject ``***SPAM*** %s``), and the markers of :data:`MARKERS` (a test
rule of our own, a prefilter) "soft reject" and "greylist" with a message.  Of the plugins,
only hfilter's client host name check is on (no DNS): HFILTER_HOSTNAME_UNKNOWN says rspamd
was given no Hostname.

Used by tests only; never imported by the running server.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import ClassVar, Final

from engine.testing.daemon import DaemonError, LoopbackDaemon
from engine.testing.mta import check_loopback, free_port

__all__ = ["GTUBE", "GTUBE_ADD_HEADER", "GTUBE_REWRITE_SUBJECT", "MARKERS", "RSPAMD",
           "RspamdInstance", "find_rspamd"]

RSPAMD: Final = "/usr/bin/rspamd"

#: The Generic Test for Unsolicited Bulk Email: rspamd rejects it.
GTUBE: Final = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
#: rspamd's test variants (``enable_test_patterns``): "add header", "rewrite subject".
GTUBE_ADD_HEADER: Final = b"Y" + GTUBE[1:]
GTUBE_REWRITE_SUBJECT: Final = b"Z" + GTUBE[1:]

#: Body markers of the test rule → (action, the SMTP message rspamd returns with it).
MARKERS: Final = {
    b"FERRY-RSPAMD-TEST-SOFT-REJECT": ("soft reject", "Try again later (ferry test)"),
    b"FERRY-RSPAMD-TEST-GREYLIST": ("greylist", "Greylisted (ferry test)"),
}

#: The required score of "reject", and the subject template of "rewrite subject".
REJECT_SCORE: Final = 15.0
SUBJECT: Final = "***SPAM*** %s"


def find_rspamd() -> Path | None:
    """rspamd's binary ($FERRY_RSPAMD, else Debian's), or None when it is not installed."""
    path = Path(os.environ.get("FERRY_RSPAMD", RSPAMD))
    return path if path.is_file() else None


def _test_rules() -> str:
    """A prefilter that sets the pre-result of a marker found in the message."""
    rows = "\n".join(f"  {{'{marker.decode()}', '{action}', '{text}'}},"
                     for marker, (action, text) in MARKERS.items())
    return f"""\
-- Test rules of engine.testing.rspamd: a marker in the message forces an action.
local markers = {{
{rows}
}}
rspamd_config:register_symbol({{
  name = 'FERRY_TEST_MARKER',
  type = 'prefilter',
  priority = 10,
  callback = function(task)
    local content = tostring(task:get_content())
    for _, m in ipairs(markers) do
      if content:find(m[1], 1, true) then
        task:set_pre_result(m[2], m[3], 'ferry_test')
        return true
      end
    end
    return false
  end,
}})
"""


class RspamdInstance(LoopbackDaemon):
    """rspamd with its configuration, database, log and PID file under ``directory``."""

    listener_name: ClassVar[str] = "rspamd"

    def __init__(self, directory: Path, address: str = "127.0.0.1", port: int = 0, *,
                 hs_cache: Path | None = None) -> None:
        """``hs_cache``: where rspamd keeps its compiled Hyperscan databases (else in
        ``directory``).  Compiling the URL matcher's 9,600 public suffixes takes rspamd
        10-30 s at every start on an empty cache, well under a second from a kept one:
        the test session passes a directory that outlives it (content-named files, checked
        by rspamd before use, recompiled when stale)."""
        super().__init__()
        check_loopback(address, "rspamd's worker", DaemonError)
        self.dir = directory
        self.address = address
        self.port = port or free_port(address)
        self.conf_path = directory / "rspamd.conf"
        self.rules_path = directory / "ferry_test.lua"
        self.db_dir = directory / "db"
        self.hs_cache = hs_cache or self.db_dir
        self.log_path = directory / "rspamd.log"
        self.output_path = directory / "rspamd.out"

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def config(self) -> str:
        d, db = self.dir, self.db_dir
        # The resolver: the discard port on loopback, where nothing answers DNS.
        return f"""\
# rspamd for Ferry's tests (engine.testing.rspamd): stock rules, no module configuration.
lua = "$RULESDIR/rspamd.lua";
lua = "{self.rules_path}";
.include "$CONFDIR/metrics.conf"
.include "$CONFDIR/groups.conf"
.include "$CONFDIR/composites.conf"
actions {{
  reject = {REJECT_SCORE};
  add_header = 6;
  greylist = 4;
  subject = "{SUBJECT}";
}}
options {{
  pidfile = "{d}/rspamd.pid";
  filters = "chartable,regexp";
  cache_file = "{db}/symbols.cache";
  hs_cache_dir = "{self.hs_cache}/";
  dynamic_conf = "{db}/dynamic";
  history_file = "{db}/history";
  stats_file = "{db}/stats.ucl";
  rrd = "{db}/rspamd.rrd";
  control_socket = "{db}/rspamd.sock mode=0600";
  tempdir = "{db}";
  url_tld = "${{SHAREDIR}}/effective_tld_names.dat";
  allow_raw_input = true;
  enable_test_patterns = true;
  local_addrs = [];
  dns {{
    nameserver = ["127.0.0.1:9"];
    timeout = 1s;
    retransmits = 1;
  }}
}}
logging {{
  type = "file";
  filename = "{self.log_path}";
  level = "info";
}}
worker "normal" {{
  bind_socket = "{self.address}:{self.port}";
  count = 1;
}}
modules {{
  path = "${{PLUGINSDIR}}";
}}
# Only the client host name check of hfilter (regular expressions, no DNS): it tells
# whether rspamd was given a Hostname (HFILTER_HOSTNAME_UNKNOWN when not).
hfilter {{
  helo_enabled = false;
  hostname_enabled = true;
  url_enabled = false;
  from_enabled = false;
  rcpt_enabled = false;
  mid_enabled = false;
}}
"""

    def _prepare(self) -> None:
        if find_rspamd() is None:
            raise DaemonError(f"no rspamd binary at {RSPAMD}: install the Debian package "
                              "rspamd (tests/run.sh does)")
        shutil.rmtree(self.db_dir, ignore_errors=True)
        self.db_dir.mkdir(parents=True)
        self.hs_cache.mkdir(parents=True, exist_ok=True)
        self.rules_path.write_text(_test_rules())
        self.conf_path.write_text(self.config())

    def _command(self) -> list[str]:
        binary = find_rspamd()
        assert binary is not None
        # -i: started by root, rspamd refuses to run its workers as root unless told (-u
        # would need a user that can reach the test's directory); the instance is the
        # test's own, on loopback, with every file in its directory.
        return [str(binary), "-f", "-i", "-c", str(self.conf_path)]

    def _probe(self) -> bool:
        # No proxy from the environment: the worker is on loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"{self.url}/ping", timeout=2) as answer:
                return bool(answer.read().strip() == b"pong")
        except (OSError, urllib.error.URLError):
            return False

    def __enter__(self) -> RspamdInstance:
        self.start()
        return self

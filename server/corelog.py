"""gRPC C-core's own log lines, turned into ours, and the peer of every failed TLS handshake.

The C core writes to file descriptor 2 in its own format (``E1201 14:21:31.215 20469 file.cc:12] …``)
and names a failed handshake's peer only in its ``handshaker`` trace. ``hdrlog server run`` therefore
points fd 2 at a pipe read by a small child process (this module run with ``-m``) that

* logs each failed handshake as one of our lines with the peer address and a reason in words
  ("TLS handshake from 198.18.0.7:40112 failed: its certificate is not signed by our CA …"),
  at most one line per peer address a minute and ``MAX_LINES`` lines per ``WINDOW`` in all, the
  rest counted in the next line so a client opening broken connections in a loop cannot fill the log;
* turns the core's warnings and errors into our format (``grpc: …``), drops its info lines;
* passes anything else (the embedded engine's notices, a fatal error's traceback) through as is.

A child, not a thread: what the process writes just before it dies (an abort message) is still read
and written out, because the pipe outlives the writer. The child ignores SIGINT/SIGTERM (a stop
signals the whole group) and ends at end of file, when the server and everything it started has
exited. Python's own ``sys.stderr`` keeps the original stream, so our log lines do not take the detour.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

log = logging.getLogger("hdrlog.server")

WINDOW = 10.0           # seconds of the overall line budget
MAX_LINES = 10          # failed-handshake lines per WINDOW, in all
PER_PEER_GAP = 60.0     # seconds between two lines about the same peer host
PIPE_BYTES = 1 << 20    # the core's pipe (fs.pipe-max-size allows 1 MiB by default)
MAX_LINE = 16 * 1024    # bytes of one line kept; the rest of a longer one is dropped and counted
RECORD_WAIT = 5.0       # seconds a failed handshake's record waits for its peer line (a starved reader)
MAX_RESTARTS = 3        # translator children started again within RESTART_WINDOW before giving up
RESTART_WINDOW = 60.0
F_SETPIPE_SZ = 1031     # fcntl.F_SETPIPE_SZ, named by Python 3.10+ on Linux only
F_GETPIPE_SZ = 1032
WATCH_INTERVAL = 2.0    # seconds between two looks at the pipe's unread bytes

# ``E1201 14:21:31.215521   20469 handshaker.cc:155] message``
_CORE_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w./-]+:\d+\] ?(.*)$")
# A record's start inside a line: a write into the full pipe kept only a record's head, and the next
# record's first line was glued to it.
_CORE_START = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ [\w./-]+:\d+\]")
# The shape of a record's continuation lines (a status' source trace, the handshaker's args): with no
# record open (its head was lost or decided already) they are the core's, not a line to pass through.
_CONTINUATION = re.compile(r"^(=== Source Location Trace|src/core/|third_party/| shutdown=|\s*$)")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
_FAILED_STEP = re.compile(r"CallNextHandshakerLocked: error=(?P<error>.*?)(?:\n=== Source Location Trace|"
                          r" shutdown=)", re.S)
_PEER = re.compile(r"endpoint_peer_address=(?:ipv4:|ipv6:)?(?P<peer>[^,}\s]+)")
_OPENSSL_REASON = re.compile(r"OPENSSL_internal:(?P<code>[A-Z0-9_]+)(?::\s*(?P<detail>.*))?")

# What an OpenSSL reason code means for whoever reads the server's log.
_REASONS = {
    "WRONG_VERSION_NUMBER": "it does not speak TLS (a collector started with --insecure, or not a collector)",
    "HTTP_REQUEST": "it sent plain HTTP, not TLS",
    "CERTIFICATE_VERIFY_FAILED": "its certificate is not signed by our CA (tls_ca)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "it sent no client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust our certificate (its tls_ca did not sign our tls_cert)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "it refused our certificate (a server name not in it, or another CA)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it says our certificate has expired",
    "TLSV1_ALERT_PROTOCOL_VERSION": "it offers no TLS version we accept",
    "NO_SHARED_CIPHER": "it offers no cipher suite we accept",
    "EXCESSIVE_MESSAGE_SIZE": "it sent a malformed TLS message",
}
_LEVELS = {"I": logging.DEBUG, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_NOISE = ("Log level INFO is not suitable for production",)  # the core's warning about the level we ask for


def handshake_failure(record: str) -> tuple[str, str] | None:
    """(peer, reason in words) when ``record`` (one C-core log record, continuation lines included)
    is the handshaker trace's report of a failed handshake, else None."""
    step = _FAILED_STEP.search(record)
    if step is None or step.group("error").strip() == "OK":
        return None
    peer = _PEER.search(record)
    if peer is None:  # failed before the endpoint was known: nothing to name
        return None
    error = step.group("error").strip()
    if error.endswith(": OK"):
        error = error[:-4]
    reason = _OPENSSL_REASON.search(error)
    if reason is not None:
        code, detail = reason.group("code"), (reason.group("detail") or "").strip()
        if detail in ("OK", "Invalid certificate verification context"):  # the core's filler, not a cause
            detail = ""
        words = _REASONS.get(code, "TLS error")
        text = f"{words} [{code}{': ' + detail if detail else ''}]"
    elif "shutdown=true" in record[step.end() - len(" shutdown="):]:
        text = "it did not finish the handshake in time (handshake_timeout), or the server was stopping"
    else:
        text = error.split("\n")[0][:200]
    return peer.group("peer"), text


class Translator:
    """Reads the core's stream line by line and decides what reaches the log."""

    def __init__(self, emit=None, now=time.monotonic, threshold: str = "W"):
        self._threshold = "IWEF"[max(0, "IWEF".find(threshold)):]  # the core's levels passed through
        emit = emit or (lambda level, msg: log.log(level, "%s", msg))
        # Control characters (a terminal's escapes, a carriage return that hides a line) never reach the log.
        self._emit = lambda level, msg: emit(level, _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", msg))
        self._record_since = 0.0
        self._now = now
        self._record: list[str] = []
        self._level = ""
        self._last_by_host: dict[str, float] = {}
        self._held_by_host: dict[str, int] = {}
        self._window_start, self._window_lines, self._window_held = now(), 0, 0

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        core = _CORE_LINE.match(line)
        if core is None:
            glued = _CORE_START.search(line, 1)
            if glued is not None:  # the rest of a record cut short, then the next record: the cut one is lost
                self._record, self._level = [], ""
                self.feed(line[glued.start():])
                return
            if self._record:   # a continuation of the record before (a status' source trace, its args)
                self._record.append(line)
            elif line and not _CONTINUATION.match(line):
                self._emit(logging.WARNING, line)  # not the core's: pass it through unchanged
            return
        self.flush(force=True)
        self._level, self._record = core.group(1), [core.group(2)]
        self._record_since = self._now()

    def flush(self, force: bool = False) -> None:
        """Decide about the record read so far (the next record's start, or a quiet moment, ends it;
        a failed handshake's record waits up to RECORD_WAIT seconds for the line that names its peer)."""
        self.tick()
        if not self._record:
            return
        if not force and "CallNextHandshakerLocked: error=" in self._record[0] \
                and not any(" shutdown=" in part for part in self._record) \
                and self._now() - self._record_since < RECORD_WAIT:
            return
        record, level = "\n".join(self._record), self._level
        self._record, self._level = [], ""
        failure = handshake_failure(record)
        if failure is not None:
            self._handshake_failed(*failure)
        elif level in self._threshold and not record.startswith(_NOISE):
            first = record.split("\n=== Source Location Trace")[0]
            self._emit(_LEVELS[level], "grpc: " + first)

    def tick(self) -> None:
        """Say how many failed-handshake lines the overall budget held back, once its window has passed."""
        now = self._now()
        if now - self._window_start >= WINDOW:
            if self._window_held:
                self._emit(logging.WARNING, f"server: {self._window_held} more failed TLS handshakes in the last "
                                            f"{now - self._window_start:.0f} s not logged one by one")
            self._window_start, self._window_lines, self._window_held = now, 0, 0

    def _handshake_failed(self, peer: str, reason: str) -> None:
        host = peer.rsplit(":", 1)[0] if peer.startswith("[") or peer.count(":") == 1 else peer
        now = self._now()
        if now - self._last_by_host.get(host, float("-inf")) < PER_PEER_GAP:
            self._held_by_host[host] = self._held_by_host.get(host, 0) + 1  # told in its next line
            return
        if self._window_lines >= MAX_LINES:
            self._window_held += 1  # told when the window ends
            return
        held = self._held_by_host.pop(host, 0)
        more = f" ({held} more from {host} since the last line)" if held else ""
        self._emit(logging.WARNING, f"server: TLS handshake from {peer} failed: {reason}{more}")
        self._last_by_host[host], self._window_lines = now, self._window_lines + 1
        if len(self._last_by_host) > 10_000:  # bounded: forget the oldest peers
            for old in sorted(self._last_by_host, key=self._last_by_host.get)[:5_000]:
                self._last_by_host.pop(old, None)
                self._held_by_host.pop(old, None)


def start(level: str = "info") -> None:
    """Route fd 2 through the translator child (call before grpc is imported). Idempotent; a no-op
    when the pipe or the child cannot be made (the core's lines then stay raw, and say so once)."""
    if os.environ.get("HDRLOG_CORELOG_ACTIVE"):
        return
    # The handshaker trace is the only place the core names a failed handshake's peer, and it
    # prints at INFO; the core's other info lines are per connection (none per call), so the level
    # costs nothing on the hot path. What the operator asked for (GRPC_VERBOSITY, default: warnings)
    # becomes the translator's threshold for the core's other lines.
    asked = os.environ.get("GRPC_VERBOSITY", "").upper()
    threshold = {"DEBUG": "I", "INFO": "I", "ERROR": "E", "NONE": "F"}.get(asked, "W")
    os.environ["GRPC_VERBOSITY"] = "DEBUG" if asked == "DEBUG" else "INFO"
    traces = [t for t in os.environ.get("GRPC_TRACE", "").split(",") if t]
    if "handshaker" not in traces:
        os.environ["GRPC_TRACE"] = ",".join([*traces, "handshaker"])
    original = os.dup(2)
    try:
        child = _spawn(level, threshold)
    except OSError as exc:
        os.close(original)
        log.warning("server: gRPC's own log lines stay in their raw format (cannot start the translator: %s)", exc)
        os.environ["GRPC_VERBOSITY"] = asked or "ERROR"
        return
    os.environ["HDRLOG_CORELOG_ACTIVE"] = str(child.pid)
    # Our own lines keep the original stream (the journal's, the terminal).
    old = sys.stderr
    sys.stderr = os.fdopen(original, "w", buffering=1, encoding="utf-8", errors="replace")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(sys.stderr)
    # The child is not waited for at the end: it ends at end of file, after this process. A child that
    # dies before (killed, out of memory) is replaced, and said so; one dying over and over is not.
    threading.Thread(target=_watch, args=(child, level, threshold), name="hdrlog-corelog", daemon=True).start()


def _spawn(level: str, threshold: str) -> subprocess.Popen:
    """A translator child reading a new pipe that fd 2 now points at."""
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen([sys.executable, "-m", "hdrlog.server.corelog", level, threshold], stdin=read_end,
                                 stdout=subprocess.DEVNULL, stderr=sys.stderr, close_fds=True)
    except OSError:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    # The core must never wait for the translator (a flood of broken handshakes while the child is
    # starved of CPU would stall gRPC's threads in write()): a roomy pipe, and a full one drops lines.
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # the system's pipe-max-size is lower: the default size still works
    os.set_blocking(write_end, False)
    os.dup2(write_end, 2)
    os.close(write_end)
    return child


def _backlog() -> tuple[int, int] | None:
    """(unread bytes, size) of the pipe fd 2 points at, or None when it cannot be told."""
    try:
        unread = struct.unpack("i", fcntl.ioctl(2, termios.FIONREAD, b"\0\0\0\0"))[0]
        return unread, fcntl.fcntl(2, F_GETPIPE_SZ)
    except OSError:
        return None


def _watch(child: subprocess.Popen, level: str, threshold: str) -> None:
    """Replace a translator that dies; say when one stops reading (stopped, starved) and lines are lost."""
    starts: list[float] = []
    behind = full = False
    while True:
        try:
            code = child.wait(timeout=WATCH_INTERVAL)
        except subprocess.TimeoutExpired:
            seen = _backlog()
            if seen is None:
                continue
            unread, size = seen
            # at least half the pipe unread on two looks in a row (a full pipe of the core's small writes
            # holds about three quarters of its size in bytes; a reader keeping up leaves next to nothing)
            was_full, full = full, unread >= size // 2
            if not behind and full and was_full:
                behind = True
                log.warning("server: the gRPC log translator (pid %d) is not reading (%d KiB unread in its pipe: "
                            "stopped, or starved of CPU); gRPC's own lines, failed TLS handshakes among them, are "
                            "dropped until it reads again", child.pid, unread >> 10)
            elif behind and unread < size // 8:
                behind = False
                log.info("server: the gRPC log translator reads again; what the core wrote meanwhile was dropped")
            continue
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        now = time.monotonic()
        starts = [t for t in starts if now - t < RESTART_WINDOW]
        if len(starts) >= MAX_RESTARTS:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
            log.error("server: the gRPC log translator exited (%s), %d times in %.0f s; not restarting it: gRPC's "
                      "own log lines and failed TLS handshakes are not logged until the server restarts",
                      how, len(starts) + 1, RESTART_WINDOW)
            return
        try:
            child = _spawn(level, threshold)
        except OSError as exc:
            log.error("server: the gRPC log translator exited (%s) and cannot be started again (%s): gRPC's own "
                      "log lines and failed TLS handshakes are not logged until the server restarts", how, exc)
            return
        starts.append(now)
        os.environ["HDRLOG_CORELOG_ACTIVE"] = str(child.pid)
        log.warning("server: the gRPC log translator exited (%s); started it again (pid %d); lines the core "
                    "wrote meanwhile are lost", how, child.pid)


def _main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # a stop signals the group: keep reading until end of file
    from hdrlog import logs

    logs.configure(argv[0] if argv else "info")
    translator = Translator(threshold=argv[1] if len(argv) > 1 else "W")
    stream = os.fdopen(0, "rb", buffering=0)
    lines = Lines()
    while True:
        ready, _, _ = select.select([stream], [], [], 1.0)
        if not ready:
            translator.flush()  # a record ends when nothing follows it for a second
            continue
        chunk = stream.read(65536)
        if not chunk:
            break
        for line in lines.split(chunk):
            translator.feed(line)
    for line in lines.end():
        translator.feed(line)
    translator.flush(force=True)
    return 0


class Lines:
    """Bytes read into lines of at most MAX_LINE bytes: a longer line keeps its start and says how
    much was cut, so a writer that never ends a line cannot make the reader hold it all."""

    def __init__(self):
        self._pending = self._head = b""
        self._cut = 0  # bytes of the current line dropped so far

    def split(self, chunk: bytes) -> list[str]:
        parts = (self._pending + chunk).split(b"\n")
        self._pending = parts.pop()
        out = [self._text(part) for part in parts]
        if len(self._pending) > MAX_LINE:
            if not self._cut:
                self._cut = len(self._pending) - MAX_LINE
                self._head = self._pending[:MAX_LINE]
            else:
                self._cut += len(self._pending)
            self._pending = b""
        return out

    def end(self) -> list[str]:
        rest, self._pending = self._pending, b""
        return [self._text(rest)] if rest or self._cut else []

    def _text(self, part: bytes) -> str:
        if self._cut:
            part, cut, self._cut = self._head, self._cut + len(part), 0
            return part.decode("utf-8", "replace") + f" [... {cut} more bytes of this line not logged]"
        if len(part) > MAX_LINE:
            return part[:MAX_LINE].decode("utf-8", "replace") + f" [... {len(part) - MAX_LINE} more bytes of " \
                                                                 "this line not logged]"
        return part.decode("utf-8", "replace")


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

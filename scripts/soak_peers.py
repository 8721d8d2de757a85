#!/usr/bin/env python3
"""The soak test's peers on loopback (scripts/soak.sh): targets and devices.

  soak_peers.py targets PORT_FILE SUMMARY_FILE SECONDS
      Three target addresses on 127.0.0.1 ports the kernel picks, written
      to PORT_FILE as "ECHO SINK DEAD": an echo server (sends back every
      byte it receives, closes once the other side has closed and every
      byte is sent back), a sink (reads and throws away), and a port that
      is bound but not listening, so every connect to it is refused (the
      port stays reserved while this runs: nothing else can take it).
      One thread, one selector. On SIGTERM, or after SECONDS whatever
      happens, writes "accepted/bytes" figures to SUMMARY_FILE and exits.

  soak_peers.py churn HOST:PORT SUMMARY_FILE SECONDS [DEVICES] [SEED]
      DEVICES (default 50) device loops, one thread each, for SECONDS. Each
      loop repeatedly connects, sends 1 to 4 chunks of 1-4 KiB of random
      bytes and reads back each chunk's echo, which must be exactly what it
      sent, then ends the connection in one of four ways at random:
        close  close() (a FIN)
        half   shutdown(SHUT_WR), then read until the daemon closes
        reset  SO_LINGER 0, then close() (an RST)
        idle   say nothing until the daemon's idle timeout closes it
      and pauses 50-250 ms. A loop that is past SECONDS finishes its
      connection and stops. Every socket operation is bounded (10 s, 15 s
      for the idle wait). Writes a JSON summary to SUMMARY_FILE, prints one
      line; exit status 1 if any connection failed (an echo that differs,
      a connection dropped or refused by the daemon, a timeout).

  soak_peers.py compare STATS_JSON SUMMARY_FILE...
      Compares `proxy-channel ctl stats --json` (after every connection
      closed) with the churn summaries: connections made against accepted,
      each ending against the daemon's reason for the device's drop, and
      target 3's refused connects. Prints one line per figure; exit status
      1 if the connection counts differ.
"""

import errno
import json
import os
import random
import selectors
import signal
import socket
import struct
import sys
import threading
import time

MODES = ("close", "half", "reset", "idle")
IO_TIMEOUT = 10.0
IDLE_WAIT = 15.0
PAUSE = (0.05, 0.25)
CHUNKS = (1, 4)
CHUNK_BYTES = (1024, 4096)

# Device drop reasons in `ctl stats --json` "drops" rows (src/control/stats.rs,
# DropKind::ALL), and the ending each one should count.
DROP_KINDS = (
    "closed_by_peer", "reset_by_peer", "idle_timeout", "connect_failed",
    "connect_timeout", "mandatory_target", "target_buffer_overflow",
    "device_failed", "too_many_connections", "closed_by_operator",
    "bad_proxy_header", "shutdown", "other",
)


def write_atomically(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


# ---------------------------------------------------------------- targets

def targets(port_file, summary_file, seconds):
    counts = {"echo_accepted": 0, "echo_bytes": 0, "sink_accepted": 0,
              "sink_bytes": 0, "resets": 0}

    def finish(*_):
        write_atomically(summary_file, json.dumps(counts) + "\n")
        os._exit(0)

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)

    sel = selectors.DefaultSelector()
    listeners = {}
    for role in ("echo", "sink"):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        listener.setblocking(False)
        sel.register(listener, selectors.EVENT_READ, ("listener", role))
        listeners[role] = listener
    # Bound, never listening: a connect to it is refused, and no other
    # process can take the port meanwhile.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    ports = (listeners["echo"].getsockname()[1],
             listeners["sink"].getsockname()[1], dead.getsockname()[1])
    write_atomically(port_file, "%d %d %d\n" % ports)

    # Per echo connection: bytes still to send back, and whether the other
    # side has closed its sending side.
    state = {}

    def close(conn):
        sel.unregister(conn)
        state.pop(conn, None)
        conn.close()

    def flush(conn):
        pending, eof = state[conn]
        if pending:
            try:
                sent = conn.send(pending)
            except BlockingIOError:
                sent = 0
            except OSError:
                counts["resets"] += 1
                close(conn)
                return
            pending = pending[sent:]
        state[conn] = (pending, eof)
        if eof and not pending:
            close(conn)
            return
        events = selectors.EVENT_WRITE if pending else selectors.EVENT_READ
        sel.modify(conn, events, ("echo", None))

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, mask in sel.select(timeout=1.0):
            kind, role = key.data
            sock = key.fileobj
            if kind == "listener":
                while True:
                    try:
                        conn, _ = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE):
                            break
                        raise
                    conn.setblocking(False)
                    counts[role + "_accepted"] += 1
                    if role == "echo":
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        state[conn] = (b"", False)
                    sel.register(conn, selectors.EVENT_READ, (role, None))
                continue
            if mask & selectors.EVENT_WRITE:
                flush(sock)
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                counts["resets"] += 1
                close(sock)
                continue
            if kind == "sink":
                counts["sink_bytes"] += len(data)
                if not data:
                    close(sock)
                continue
            counts["echo_bytes"] += len(data)
            pending, _ = state[sock]
            state[sock] = (pending + data, not data)
            flush(sock)
    finish()


# ------------------------------------------------------------------ churn

class Failure(Exception):
    pass


def recv_exactly(conn, size):
    parts = []
    got = 0
    while got < size:
        data = conn.recv(size - got)
        if not data:
            raise Failure("closed by the daemon after %d of %d echoed bytes" % (got, size))
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def read_to_eof(conn, mode, totals):
    """Bytes received until the daemon closes; a close by RST is counted."""
    extra = 0
    while True:
        try:
            data = conn.recv(65536)
        except ConnectionResetError:
            totals["closed_by_rst"][mode] += 1
            return extra
        if not data:
            return extra
        extra += len(data)


def one_connection(address, rng, mode, totals):
    conn = socket.create_connection(address, timeout=IO_TIMEOUT)
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        totals["connections"] += 1
        for _ in range(rng.randint(*CHUNKS)):
            chunk = rng.randbytes(rng.randint(*CHUNK_BYTES))
            conn.sendall(chunk)
            echoed = recv_exactly(conn, len(chunk))
            if echoed != chunk:
                totals["mismatches"] += 1
                raise Failure("echo differs from what was sent (%d bytes)" % len(chunk))
            totals["bytes"] += len(chunk)
        if mode == "close":
            pass
        elif mode == "half":
            conn.shutdown(socket.SHUT_WR)
            extra = read_to_eof(conn, mode, totals)
            if extra:
                raise Failure("half: %d bytes after every echo" % extra)
        elif mode == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            started = time.monotonic()
            conn.settimeout(IDLE_WAIT)
            try:
                extra = read_to_eof(conn, mode, totals)
            except socket.timeout:
                raise Failure("idle: not closed by the daemon within %.0f s" % IDLE_WAIT)
            waited = time.monotonic() - started
            if extra:
                raise Failure("idle: %d bytes after every echo" % extra)
            totals["idle_waits"].append(waited)
        totals["ended"][mode] += 1
    finally:
        conn.close()


def device_loop(address, rng, deadline, totals, lock):
    local = {"connections": 0, "bytes": 0, "mismatches": 0, "idle_waits": [],
             "ended": {m: 0 for m in MODES}, "closed_by_rst": {m: 0 for m in MODES}}
    failures = []
    while time.monotonic() < deadline:
        mode = rng.choice(MODES)
        try:
            one_connection(address, rng, mode, local)
        except (Failure, OSError) as e:
            failures.append("%s: %s: %s" % (mode, type(e).__name__, e))
        time.sleep(rng.uniform(*PAUSE))
    with lock:
        for key in ("connections", "bytes", "mismatches"):
            totals[key] += local[key]
        totals["idle_waits"].extend(local["idle_waits"])
        for mode in MODES:
            totals["ended"][mode] += local["ended"][mode]
            totals["closed_by_rst"][mode] += local["closed_by_rst"][mode]
        totals["failures"].extend(failures)


def churn(address, summary_file, seconds, devices=50, seed=None):
    host, port = address.rsplit(":", 1)
    address = (host, int(port))
    seed = int(seed) if seed is not None else random.randrange(1 << 30)
    started = time.monotonic()
    deadline = started + seconds
    totals = {"connections": 0, "bytes": 0, "mismatches": 0, "idle_waits": [],
              "ended": {m: 0 for m in MODES}, "closed_by_rst": {m: 0 for m in MODES},
              "failures": []}
    lock = threading.Lock()
    threads = [
        threading.Thread(target=device_loop, daemon=True,
                         args=(address, random.Random(seed * 1000 + i), deadline, totals, lock))
        for i in range(devices)
    ]
    for thread in threads:
        thread.start()
    # A loop ends within one connection after the deadline: at most the
    # connect, 4 echoes and the idle wait, each bounded.
    for thread in threads:
        thread.join(max(0.0, deadline + IO_TIMEOUT * 6 + IDLE_WAIT - time.monotonic()))
    elapsed = time.monotonic() - started
    stuck = sum(thread.is_alive() for thread in threads)
    waits = totals.pop("idle_waits")
    summary = dict(totals, seed=seed, devices=devices, seconds=round(elapsed, 1),
                   stuck_loops=stuck, failed=len(totals["failures"]),
                   idle_wait_min=round(min(waits), 2) if waits else None,
                   idle_wait_max=round(max(waits), 2) if waits else None)
    summary["failures"] = totals["failures"][:20]
    write_atomically(summary_file, json.dumps(summary) + "\n")
    ended = " ".join("%s %d" % (m, totals["ended"][m]) for m in MODES)
    print("churn: %d connections in %.0f s (%.0f/s), %.1f MiB echoed and checked; ended: %s;"
          " idle closes after %s-%s s; failures %d, echo mismatches %d%s"
          % (totals["connections"], elapsed, totals["connections"] / elapsed,
             totals["bytes"] / 1048576, ended, summary["idle_wait_min"],
             summary["idle_wait_max"], summary["failed"], totals["mismatches"],
             ", loops stuck %d" % stuck if stuck else ""))
    rst = sum(totals["closed_by_rst"].values())
    if rst:
        print("churn: the daemon closed %d half/idle connections with an RST, not a FIN: %s"
              % (rst, totals["closed_by_rst"]))
    for failure in summary["failures"][:5]:
        print("churn: failed: %s" % failure)
    return 1 if summary["failed"] or stuck else 0


# ---------------------------------------------------------------- compare

def compare(stats_file, summary_files):
    with open(stats_file) as f:
        stats = json.load(f)["stats"]
    made = 0
    ended = {m: 0 for m in MODES}
    failed = 0
    for path in summary_files:
        with open(path) as f:
            summary = json.load(f)
        made += summary["connections"]
        failed += summary["failed"]
        for mode in MODES:
            ended[mode] += summary["ended"][mode]
    device = dict(zip(DROP_KINDS, stats["drops"][0]))
    total = stats["connections_total"]
    print("connections: made by the devices %d, accepted by the daemon %d, open %d, refused %d"
          % (made, total, stats["connections_open"], stats["connections_refused"]))
    print("device drops: closed_by_peer %d (close+half ended %d), reset_by_peer %d (reset %d),"
          " idle_timeout %d (idle %d), others %d (failed connections %d)"
          % (device["closed_by_peer"], ended["close"] + ended["half"],
             device["reset_by_peer"], ended["reset"], device["idle_timeout"], ended["idle"],
             sum(device.values()) - device["closed_by_peer"] - device["reset_by_peer"]
             - device["idle_timeout"], failed))
    target3 = dict(zip(DROP_KINDS, stats["drops"][3]))
    others3 = {k: v for k, v in target3.items() if v and k != "connect_failed"}
    print("target 3: connect failures %d of %d connections%s"
          % (stats["connect_failures"][3], total,
             "; other drops: %s" % others3 if others3 else ""))
    print("messages: made %d, written %d, write errors %d"
          % (stats["messages_queued"], stats["messages_written"], stats["write_errors"]))
    return 0 if made == total and stats["connections_open"] == 0 else 1


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 4 and args[0] == "targets":
        targets(args[1], args[2], float(args[3]))
    elif 4 <= len(args) <= 6 and args[0] == "churn":
        sys.exit(churn(args[1], args[2], float(args[3]),
                       int(args[4]) if len(args) > 4 else 50,
                       args[5] if len(args) > 5 else None))
    elif len(args) >= 3 and args[0] == "compare":
        sys.exit(compare(args[1], args[2:]))
    else:
        sys.exit(__doc__)

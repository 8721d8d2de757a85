#!/usr/bin/env python3
"""The demo's peers on loopback: two target platforms and one GPS tracker.

  demo_peers.py targets PORT_FILE OUT_DIR
      Two target servers on free 127.0.0.1 ports, written to PORT_FILE as
      "PORT1 PORT2". Target 1 ("platform A") answers every line with
      "ACK <n>\\r\\n"; target 2 ("platform B") only records. What each one
      receives is appended to OUT_DIR/target1.txt and target2.txt. Stops
      on SIGTERM, or after 30 s whatever happens.

  demo_peers.py device HOST:PORT
      A tracker: sends three NMEA-like lines 200 ms apart, prints each
      reply, closes its sending side and waits for the daemon to close.
"""

import os
import signal
import socket
import sys
import threading
import time

LINES = [
    b"$GPRMC,101500.00,A,5231.0000,N,01323.0000,E,0.0,0.0,261126,,,A*6C\r\n",
    b"$GPRMC,101501.00,A,5231.0010,N,01323.0020,E,4.2,90.0,261126,,,A*60\r\n",
    b"$GPRMC,101502.00,A,5231.0020,N,01323.0040,E,4.3,90.0,261126,,,A*62\r\n",
]


def serve(listener, out_path, answer):
    conn, _ = listener.accept()
    conn.settimeout(30)
    count = 0
    pending = b""
    with conn, open(out_path, "ab", buffering=0) as out:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            out.write(data)
            pending += data
            while answer and b"\n" in pending:
                _, pending = pending.split(b"\n", 1)
                count += 1
                conn.sendall(b"ACK %d\r\n" % count)


def targets(port_file, out_dir):
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    listeners = []
    for _ in range(2):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listeners.append(listener)
    ports = " ".join(str(l.getsockname()[1]) for l in listeners)
    with open(port_file + ".tmp", "w") as f:
        f.write(ports + "\n")
    os.rename(port_file + ".tmp", port_file)
    for number, listener in enumerate(listeners, start=1):
        out = os.path.join(out_dir, "target%d.txt" % number)
        threading.Thread(
            target=serve, args=(listener, out, number == 1), daemon=True
        ).start()
    time.sleep(30)


def device(address):
    host, port = address.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=5)
    for line in LINES:
        conn.sendall(line)
        print("device sent:     %s" % line.decode().strip())
        print("device received: %s" % conn.recv(4096).decode().strip())
        time.sleep(0.2)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(4096):
        pass
    conn.close()
    print("device: connection closed by the daemon after the targets closed")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "targets":
        targets(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "device":
        device(sys.argv[2])
    else:
        sys.exit(__doc__)

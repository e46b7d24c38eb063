#!/usr/bin/env python3
"""A minimal undertone client (docs/protocol.md): hello, stream a WAV file in
20 ms chunks, end_turn, print the answer as it streams.

    pip install -r examples/requirements.txt
    python3 examples/python_client.py speech.wav --server tcp://127.0.0.1:5555
    UNDERTONE_AUTH_TOKEN=secret python3 examples/python_client.py speech.wav   # server with an auth token

Reads 16-bit PCM WAV (any rate and channel count: the server resamples).
"""
import argparse
import os
import sys
import time
import wave

import msgpack
import zmq

VERSION = 1


def send(sock, header, payload=None):
    header = dict(header, v=VERSION)
    parts = [msgpack.packb(header, use_bin_type=True)]
    if payload is not None:
        parts.append(payload)
    sock.send_multipart(parts)


def receive(sock, timeout_ms):
    """The next server header as a dict, or None on timeout."""
    if not sock.poll(timeout_ms):
        return None
    parts = sock.recv_multipart()
    return msgpack.unpackb(parts[0], raw=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wav", help="16-bit PCM WAV file")
    ap.add_argument("--server", default="tcp://127.0.0.1:5555")
    ap.add_argument("--speed", type=float, default=1.0, help="1 = real time, 0 = as fast as possible")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    ap.add_argument("--token", default=os.environ.get("UNDERTONE_AUTH_TOKEN", ""),
                    help="the server's auth token (default: env UNDERTONE_AUTH_TOKEN; none if unset)")
    args = ap.parse_args()

    with wave.open(args.wav, "rb") as w:
        if w.getsampwidth() != 2:
            sys.exit(f"{args.wav}: only 16-bit PCM WAV is supported here")
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = w.readframes(w.getnframes())

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(args.server)

    hello = {"t": "hello", "name": "python-example"}
    if args.token:
        hello["token"] = args.token  # optional key: a server without a token ignores it
    send(sock, hello)
    msg = receive(sock, int(args.timeout * 1000))
    if msg is None:
        sys.exit(f"no undertone server answered at {args.server} within {args.timeout} s")
    if msg["t"] != "welcome":
        sys.exit(f"server refused: {msg.get('name')}: {msg.get('msg')}")
    print(f"session {msg['session']} ({msg.get('models', '')})", file=sys.stderr)

    # One turn per file, ended by us rather than by the server's VAD.
    send(sock, {"t": "config", "vad": False})

    frame_bytes = 2 * channels
    chunk = rate // 50 * frame_bytes  # 20 ms
    seq = 0
    start = time.monotonic()
    for off in range(0, len(pcm), chunk):
        send(sock, {"t": "audio", "seq": seq, "fmt": "s16", "sr": rate, "ch": channels}, pcm[off:off + chunk])
        seq += 1
        if args.speed > 0:
            time.sleep(max(0.0, start + seq * 0.02 / args.speed - time.monotonic()))
    send(sock, {"t": "end_turn", "seq": seq})
    end_of_turn = time.monotonic()

    first = None
    while True:
        msg = receive(sock, 120_000)
        if msg is None:
            sys.exit("no answer within 120 s")
        t = msg["t"]
        if t == "delta":
            if first is None:
                first = time.monotonic()
            print(msg["text"], end="", flush=True)
        elif t == "turn_end":
            print()
            if first is not None:
                print(f"first token {1000 * (first - end_of_turn):.0f} ms after end_turn; "
                      f"stop: {msg['stop']}", file=sys.stderr)
            break
        elif t == "event":
            print(f"[{msg['name']} {msg.get('label', '')}]", file=sys.stderr)
        elif t == "error":
            print(f"server {'error' if msg.get('fatal') else 'warning'}: {msg.get('name')}: {msg.get('msg')}",
                  file=sys.stderr)
            if msg.get("fatal"):
                sys.exit(1)

    send(sock, {"t": "bye"})
    sock.close()
    ctx.term()


if __name__ == "__main__":
    main()

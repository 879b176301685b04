#!/usr/bin/env python3
"""The least a verifying cold relay can cost on this machine: a reference, not a mirror.

    relay-floor.py MODE LISTEN_PORT ORIGIN_PORT STORE_FILE

For each connection: read one GET, make the same GET (path only) to the origin on
127.0.0.1:ORIGIN_PORT, and relay the Content-Length body to the client while writing it to
STORE_FILE, one request per connection, nothing else (no keep-alive, no errors answered, no
caching decisions, no temp-file rename, no concurrency). The CPU this process spends per
byte is a floor for any mirror that stores and verifies what it relays, on this kernel:

- copy:          recv into a 1 MiB buffer, sha256 (OpenSSL through hashlib, SHA-NI when
                 the CPU has it), write to the file, send to the client;
- copy-nohash:   the same without the hash;
- splice:        zero-copy: splice the origin socket into a pipe, tee it into a second
                 pipe spliced into the file, splice the first to the client; the hash reads
                 the bytes back from the page cache with pread (the kernel's AF_ALG hash
                 sockets, which would hash spliced pages without bringing them to user
                 space, are refused on kernels built without CONFIG_CRYPTO_USER_API_HASH);
- splice-nohash: the same without the hash.

It prints a line per GET to stderr, and "digest mismatch" when the sha256 of what it relayed
is not the digest in the path (hash modes only). Used by bench/cold-ab.sh (FLOOR=...).
"""
import ctypes
import fcntl
import hashlib
import os
import socket
import sys

MODES = ("copy", "copy-nohash", "splice", "splice-nohash")
CHUNK = 1 << 20
F_SETPIPE_SZ = 1031
libc = ctypes.CDLL(None, use_errno=True)


def tee(src, dst, n):
    r = libc.tee(src, dst, ctypes.c_size_t(n), 0)
    if r < 0:
        raise OSError(ctypes.get_errno(), "tee")
    return r


def pipe():
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, CHUNK)
    return r, w


def splice_all(src, dst, n, flags=0):
    while n:
        k = os.splice(src, dst, n, flags=flags)
        if k == 0:
            raise EOFError("splice")
        n -= k


def read_head(sock):
    """Byte by byte up to the blank line, so that no body byte is taken from the socket."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        b = sock.recv(1)
        if not b:
            raise EOFError("head")
        head += b
    return head


def relay(mode, client, origin_port, store):
    path = read_head(client).split(b" ")[1].split(b"?")[0]
    origin = socket.create_connection(("127.0.0.1", origin_port))
    origin.sendall(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" % path)
    head = read_head(origin)
    size = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:"))
    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % size)
    fd = os.open(store, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    digest = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    left, offset = size, 0
    if mode.startswith("splice"):
        (ar, aw), (br, bw) = pipe(), pipe()
        while left:
            n = os.splice(origin.fileno(), aw, min(left, CHUNK), flags=os.SPLICE_F_MOVE | os.SPLICE_F_MORE)
            if n == 0:
                raise EOFError("origin")
            left -= n
            if tee(ar, bw, n) != n:
                raise OSError("short tee")
            splice_all(br, fd, n)
            if mode == "splice":
                if os.preadv(fd, [view[:n]], offset) != n:
                    raise OSError("short pread")
                digest.update(view[:n])
            offset += n
            splice_all(ar, client.fileno(), n, os.SPLICE_F_MORE if left else 0)
        for p in (ar, aw, br, bw):
            os.close(p)
    else:
        while left:
            n = origin.recv_into(buf, min(left, CHUNK))
            if n == 0:
                raise EOFError("origin")
            left -= n
            if mode == "copy":
                digest.update(view[:n])
            os.write(fd, view[:n])
            client.sendall(view[:n])
    os.close(fd)
    origin.close()
    client.close()
    want = path.rsplit(b"sha256:", 1)[-1].decode()
    ok = mode.endswith("nohash") or b"sha256:" not in path or digest.hexdigest() == want
    print(f"relay-floor {mode} {size} bytes{'' if ok else ' digest mismatch'}", file=sys.stderr, flush=True)


def main():
    mode, port, origin_port, store = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if mode not in MODES:
        sys.exit(f"relay-floor: mode {mode!r} is not one of {', '.join(MODES)}")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    while True:
        client, _ = listener.accept()
        try:
            relay(mode, client, origin_port, store)
        except (OSError, EOFError, StopIteration, IndexError) as e:
            print(f"relay-floor {mode}: {e}", file=sys.stderr, flush=True)
            client.close()


if __name__ == "__main__":
    main()

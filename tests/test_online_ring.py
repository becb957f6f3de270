"""The shared-memory ring between the scheduler and the recorder process (sglang_ext/online/ring.py): entries
come out whole and in order, a full ring drops the oldest entries (counted) instead of blocking the writer, and
a reader in another process racing a writer that overwrites it never returns a torn entry."""
import hashlib
import os
import random
import subprocess
import sys
import textwrap

import pytest

from sglang_ext.online.ring import Ring


def payload(i: int, n: int) -> bytes:
    """n bytes that name entry i and carry their own checksum (the first 16 bytes)."""
    body = random.Random(i).randbytes(max(0, n - 16))
    return hashlib.blake2b(body, digest_size=16).digest()[:16] + body if n >= 16 else bytes([i % 256]) * n


def intact(p: bytes) -> bool:
    return len(p) < 16 or hashlib.blake2b(p[16:], digest_size=16).digest() == p[:16]


def test_entries_come_out_whole_and_in_order_across_wraps():
    ring = Ring.create(8192)
    reader = Ring.attach(os.dup(ring.fd))
    rng = random.Random(0)
    sent, got = [], []
    for i in range(2000):
        p = payload(i, rng.choice([0, 1, 7, 8, 100, 1000, 3000]))
        assert ring.put(p)
        sent.append(p)
        if rng.random() < 0.7:                     # the reader keeps up, mostly
            while (x := reader.get()) is not None:
                got.append(x)
    while (x := reader.get()) is not None:
        got.append(x)
    assert ring.dropped == 0 and got == sent
    assert ring.head > 10 * ring.capacity and ring.nbytes() == 0
    assert ring.put(b"x" * (ring.capacity // 2)) is False          # can never fit: refused, nothing dropped
    reader.close()
    ring.close()


def test_a_full_ring_drops_the_oldest_entries_and_counts_them():
    ring = Ring.create(8192)
    reader = Ring.attach(os.dup(ring.fd))
    sent = [payload(i, 1000) for i in range(40)]
    for p in sent:
        assert ring.put(p)                          # never blocks: no reader yet
    got = []
    while (x := reader.get()) is not None:
        got.append(x)
    assert ring.dropped > 0 and len(got) + ring.dropped == len(sent)
    assert got == sent[ring.dropped:]               # the newest survive, in order
    assert ring.nbytes() <= ring.capacity
    reader.close()
    ring.close()


READER = textwrap.dedent("""
    import hashlib, os, sys, time
    sys.path.insert(0, sys.argv[2])
    from sglang_ext.online.ring import Ring
    ring = Ring.attach(int(sys.argv[1]))
    seen, bad, idle = [], 0, 0
    while idle < 200:
        p = ring.get()
        if p is None:
            idle += 1
            time.sleep(0.005)
            continue
        idle = 0
        if len(p) >= 16 and hashlib.blake2b(p[16:], digest_size=16).digest() != p[:16]:
            bad += 1
        seen.append(int.from_bytes(p[16:20], "little"))
        time.sleep(0.0005)                          # slower than the writer: the ring overflows
    print(len(seen), bad, all(a < b for a, b in zip(seen, seen[1:])))
""")


def test_a_slow_reader_in_another_process_never_gets_a_torn_entry(tmp_path):
    ring = Ring.create(1 << 16)
    script = tmp_path / "reader.py"
    script.write_text(READER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, str(script), str(ring.fd), root], pass_fds=[ring.fd],
                            stdout=subprocess.PIPE, text=True)
    rng = random.Random(1)
    n = 3000
    for i in range(n):
        body = i.to_bytes(4, "little") + rng.randbytes(rng.choice([100, 2000, 9000]))
        assert ring.put(hashlib.blake2b(body, digest_size=16).digest() + body)
    out, _ = proc.communicate(timeout=120)
    received, torn, ordered = out.split()
    assert int(torn) == 0 and ordered == "True"
    assert ring.dropped > 0, "the writer should have outrun the reader"
    # every entry arrived or was counted dropped (one the reader took at the very moment the writer gave it up
    # is counted as both)
    assert int(received) < n <= int(received) + ring.dropped
    ring.close()


def test_attach_refuses_what_is_not_a_ring(tmp_path):
    f = tmp_path / "junk"
    f.write_bytes(b"\0" * 8192)
    fd = os.open(f, os.O_RDWR)
    with pytest.raises(ValueError, match="is not a ring"):
        Ring.attach(fd)
    os.close(fd)

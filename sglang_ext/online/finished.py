"""A finished request as it crosses from the scheduler process to the recorder process (no SGLang here).

    CapturedRequest      one finished request: its feature rows by position (gathered from the feature pool at
                         release, scheduler/pool.py), which of them are its own, its token ids, mRoPE positions and
                         what it finished with (built by scheduler/capture.py, read by recorder/records.py)
    encode_finished      -> one entry of the ring (ring.Ring), written in place with one copy of the rows
    decode_finished      an entry -> a CapturedRequest whose rows are views of the entry's bytes

The entry format is the scheduler's only contract with the recorder.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch

_LEN = struct.Struct("<I")


@dataclass
class CapturedRequest:
    """One finished request's capture."""
    rid: str
    rows: torch.Tensor | None = None       # [L, K*H] host: the pool's rows of positions start..start+L-1
    covered: torch.Tensor | None = None    # [L] bool: the row is the features of that position's token (else a gap)
    start: int = 0                         # position of rows[0] (0, or where the radix-cache hit ends when the
                                           # hit is not filled from the pool)
    cached: int = 0                        # the radix-cache hit: positions the target did not recompute for it
    token_ids: list[int] = field(default_factory=list)   # prompt + generated, as SGLang finished them
    key_ids: list[int] = field(default_factory=list)     # the same with SGLang's image pad values (radix keys)
    prompt_len: int = 0
    mrope_prompt: torch.Tensor | None = None             # [3, prompt_len], None for text-only
    mrope_delta: torch.Tensor | int = 0
    modalities: tuple[str, ...] = ()       # request_modalities(): "audio" / "image" / "video" inputs
    finish_reason: str = ""
    copied: object = None                  # CUDA event after the device -> host copies (None: done)

    def nbytes(self) -> int:
        """Host bytes of its feature rows."""
        return 0 if self.rows is None else self.rows.numel() * self.rows.element_size()

    def resolve(self) -> None:
        """Wait for the device -> host copies (the recorder's side never waits: `resolvable` first)."""
        if self.copied is not None:
            self.copied.synchronize()
            self.copied = None
        self.mrope_delta = int(torch.as_tensor(self.mrope_delta).reshape(-1)[0])


def _ids(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64).reshape(-1)


def _align(n: int) -> int:
    return (n + 7) & ~7


def encode_finished(p: CapturedRequest, reserve) -> bool:
    """Write the resolved request `p` as one entry: `reserve(n)` returns a writable view of n bytes (or None: it
    cannot fit), filled here and committed by the caller. Layout: u32 header length, JSON header, then 8-byte
    aligned arrays: token ids, radix keys (when they differ), mRoPE prompt positions, covered flags, feature rows."""
    token_ids = _ids(p.token_ids)
    keys = None if p.key_ids == p.token_ids else _ids(p.key_ids)
    mrope = None if p.mrope_prompt is None else p.mrope_prompt.to(torch.int64)
    rows = p.rows if p.rows is not None else torch.zeros(0, 0)
    covered = (p.covered if p.covered is not None else torch.zeros(0, dtype=torch.bool)).to(torch.uint8)
    head = {"rid": p.rid, "prompt_len": p.prompt_len, "finish_reason": p.finish_reason,
            "modalities": list(p.modalities), "mrope_delta": int(p.mrope_delta),
            "tokens": int(token_ids.numel()), "keys": None if keys is None else int(keys.numel()),
            "mrope": None if mrope is None else list(mrope.shape),
            "start": int(p.start), "cached": int(p.cached), "rows": int(rows.shape[0]), "width": int(rows.shape[1]),
            "dtype": str(rows.dtype).removeprefix("torch.")}
    header = json.dumps(head, separators=(",", ":")).encode()
    arrays = [token_ids] + ([keys] if keys is not None else []) + ([mrope] if mrope is not None else []) \
        + [covered, rows]
    offset = _align(_LEN.size + len(header))
    total = offset + sum(_align(a.numel() * a.element_size()) for a in arrays)
    view = reserve(total)
    if view is None:
        return False
    _LEN.pack_into(view, 0, len(header))
    view[_LEN.size:_LEN.size + len(header)] = header
    for a in arrays:
        n = a.numel() * a.element_size()
        if n:
            out = torch.frombuffer(view, dtype=torch.uint8, count=n, offset=offset)
            out.copy_(a.detach().contiguous().reshape(-1).view(torch.uint8))
        offset += _align(n)
    return True


def decode_finished(payload: bytes | bytearray) -> CapturedRequest:
    """An entry written by `encode_finished` -> a CapturedRequest (its rows are views of `payload`)."""
    buf = payload if isinstance(payload, bytearray) else bytearray(payload)
    (n,) = _LEN.unpack_from(buf, 0)
    head = json.loads(bytes(buf[_LEN.size:_LEN.size + n]))
    offset = _align(_LEN.size + n)

    def take(count: int, dtype: torch.dtype) -> torch.Tensor:
        nonlocal offset
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=offset) if count else torch.empty(0, dtype=dtype)
        offset += _align(count * torch.empty((), dtype=dtype).element_size())
        return t

    token_ids = take(head["tokens"], torch.int64).tolist()
    key_ids = take(head["keys"], torch.int64).tolist() if head["keys"] is not None else list(token_ids)
    mrope = None
    if head["mrope"] is not None:
        shape = head["mrope"]
        mrope = take(shape[0] * shape[1], torch.int64).view(*shape)
    n_rows, width = head["rows"], head["width"]
    covered = take(n_rows, torch.uint8).bool()
    rows = take(n_rows * width, getattr(torch, head["dtype"])).view(n_rows, width)
    return CapturedRequest(rid=head["rid"], rows=rows, covered=covered, start=head["start"],
                           cached=head.get("cached", 0), token_ids=token_ids,
                           key_ids=key_ids,
                           prompt_len=head["prompt_len"], mrope_prompt=mrope, mrope_delta=head["mrope_delta"],
                           modalities=tuple(head["modalities"]), finish_reason=head["finish_reason"])


def resolvable(p: CapturedRequest) -> bool:
    """Its device -> host copies (feature rows, mRoPE positions) have landed: `resolve()` will not wait."""
    return p.copied is None or p.copied.query()

"""Target features of token prefixes, kept so that a radix-cache hit is not a hole in a record.

SGLang does not recompute a prompt prefix its radix cache holds (turn 2 of a chat is turn 1's whole
conversation; requests share a system prompt), so capture sees no rows there. The live draft still attends to
real context at those positions: its KV for the prefix was computed from real features when the prefix was
first prefilled. This store keeps the rows of every recorded request, keyed the way the radix cache matches
them, so a later record's gap is filled with exactly those features; what is not found stays a gap.

Keys. The features at position t depend only on the tokens at positions 0..t (a causal target; image tokens
carry SGLang's per-image pad value, so two images never share a key). Rows are stored in pages of `page`
positions: page i (positions [i*page, (i+1)*page)) is filed under a hash chain over the tokens of pages 0..i-1,
with its own tokens beside it. A lookup walks the same chain over the new request's tokens and, under each
key, takes from the candidate page the rows up to where its tokens stop matching (so a prefix that ends mid
page is filled too). Candidates per key are few (different continuations of one prefix).

Bounded in bytes: least recently used pages go first. Used by the replay buffer's thread only.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

PAGE = 16                     # positions per page
MAX_CANDIDATES = 8            # pages kept per key (continuations of one prefix), newest first


@dataclass
class FillStats:
    filled: int = 0           # gap rows filled from the store
    left: int = 0             # gap rows not found (still gaps)


def _chain(prev: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(prev + b"".join(t.to_bytes(8, "little", signed=True) for t in tokens),
                           digest_size=16).digest()


class PrefixFeatureStore:
    def __init__(self, budget_bytes: int, page: int = PAGE):
        self.budget_bytes = int(budget_bytes)
        self.page = int(page)
        self.pages: OrderedDict[tuple[bytes, tuple[int, ...]], torch.Tensor] = OrderedDict()  # LRU order
        self.by_key: dict[bytes, list[tuple[int, ...]]] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.pages)

    def _walk(self, token_ids: list[int], n: int):
        """(start, end, chain key of the tokens before start) of every page of the first n positions."""
        key = b""
        for start in range(0, n, self.page):
            end = min(start + self.page, n)
            yield start, end, key
            key = _chain(key, token_ids[start:end])

    def add(self, token_ids: list[int], features: torch.Tensor, covered: torch.Tensor) -> None:
        """Keep the rows of every page whose positions were all captured. token_ids: at least the positions of
        `features` [S, F] (SGLang's ids: image pad values included); covered [S] bool."""
        n = features.shape[0]
        for start, end, key in self._walk(token_ids, n):
            if not bool(covered[start:end].all()):
                continue
            tokens = tuple(token_ids[start:end])
            entry = (key, tokens)
            old = self.pages.pop(entry, None)
            if old is not None:
                self.nbytes -= old.numel() * old.element_size()
            else:
                cands = self.by_key.setdefault(key, [])
                cands.insert(0, tokens)
                for dropped in cands[MAX_CANDIDATES:]:
                    gone = self.pages.pop((key, dropped), None)
                    if gone is not None:
                        self.nbytes -= gone.numel() * gone.element_size()
                del cands[MAX_CANDIDATES:]
            rows = features[start:end].clone()        # the newest computation: what the radix cache holds now
            self.pages[entry] = rows
            self.nbytes += rows.numel() * rows.element_size()
        self._evict()

    def fill(self, token_ids: list[int], features: torch.Tensor, covered: torch.Tensor) -> FillStats:
        """Fill the rows of `features` that are not `covered` from the store, in place (covered too)."""
        stats = FillStats()
        n = features.shape[0]
        for start, end, key in self._walk(token_ids, n):
            need = ~covered[start:end]
            if not bool(need.any()):
                continue
            tokens = token_ids[start:end]
            best, best_len = None, 0
            for cand in self.by_key.get(key, ()):
                m = 0
                while m < min(len(cand), len(tokens)) and cand[m] == tokens[m]:
                    m += 1
                if m > best_len:
                    best, best_len = cand, m
            if best is not None:
                rows = self.pages[(key, best)]
                self.pages.move_to_end((key, best))
                take = need.clone()
                take[best_len:] = False
                idx = take.nonzero().flatten()
                features[start + idx] = rows[idx].to(features.dtype)
                covered[start + idx] = True
                stats.filled += int(idx.numel())
            stats.left += int((~covered[start:end]).sum())
        return stats

    def _evict(self) -> None:
        while self.nbytes > self.budget_bytes and self.pages:
            (key, tokens), rows = self.pages.popitem(last=False)
            self.nbytes -= rows.numel() * rows.element_size()
            cands = self.by_key.get(key)
            if cands is not None:
                cands.remove(tokens)
                if not cands:
                    del self.by_key[key]

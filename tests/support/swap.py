"""The check both draft kinds' staged-swap tests make against SGLang's own load_weights."""
from __future__ import annotations

import torch

from sglang_ext.online.swap.staging import StagedSwap, plan_placements


def assert_staged_swap_equals_load_weights(kind, live, reference, layout, load_reference, skip=()) -> None:
    """Every slot weight of `layout` is placed in SGLang's draft `live`, and a new version copied through the
    staging buffers leaves `live` equal (in the same storage) to `reference` after `load_reference(weights)`
    (SGLang's load_weights); parameters named in `skip` (shared with the target) are not compared."""
    placements = plan_placements(kind, live, layout)
    assert placements is not None and sorted(p.name for p in placements) == sorted(n for n, _ in layout)
    new = {name: torch.randn(shape) for name, shape in layout}
    load_reference(list(new.items()))
    storage = [p.data_ptr() for p in live.parameters()]
    swap = StagedSwap(live, placements)
    swap.stage(new, version=1)
    swap.apply()
    assert [p.data_ptr() for p in live.parameters()] == storage
    ref = dict(reference.named_parameters())
    for name, p in live.named_parameters():
        if name not in skip:
            assert torch.equal(p, ref[name]), name

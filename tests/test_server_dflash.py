"""Real SGLang (CPU platform) serving tiny Qwen3-VL targets with DFLASH: greedy outputs must equal
non-speculative serving, and the hand-built draft must really get drafts accepted."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_ext.demo.prompts import mixed_requests
from sglang_ext.launcher import draft_args, launch_server

pytestmark = pytest.mark.server
MAX_NEW_TOKENS = 24


def _generate_all(server, requests, concurrent=False):
    def one(req):
        text, images = req
        return server.generate(text, images, max_new_tokens=MAX_NEW_TOKENS)
    if concurrent:
        with ThreadPoolExecutor(len(requests)) as pool:
            return list(pool.map(one, requests))
    return [one(r) for r in requests]


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_dflash_greedy_equals_plain_and_accepts_drafts(tiny, server_log_dir, variant):
    target = getattr(tiny, variant)
    draft = tiny.draft_dense if variant == "dense" else tiny.draft_moe
    requests = mixed_requests(n_text=6, n_image=2)

    with launch_server(target, log_dir=server_log_dir, name=f"plain-{variant}") as plain:
        expected = [r["output_ids"] for r in _generate_all(plain, requests)]
    with launch_server(target, draft_args(draft), log_dir=server_log_dir, name=f"dflash-{variant}") as spec:
        results = _generate_all(spec, requests)
        concurrent = _generate_all(spec, requests, concurrent=True)

    for i, (want, got) in enumerate(zip(expected, results)):
        assert len(got["output_ids"]) == MAX_NEW_TOKENS
        assert got["output_ids"] == want, f"request {i} ({'image' if requests[i][1] else 'text'}) differs"
    for i, (want, got) in enumerate(zip(expected, concurrent)):
        assert got["output_ids"] == want, f"request {i} differs when the batch is served concurrently"
    # The image changes the answer (else the image path would not be tested at all).
    assert expected[6] != expected[7]

    metas = [r["meta_info"] for r in results]
    accept_lengths = [m["spec_accept_length"] for m in metas]
    assert all(m["spec_verify_ct"] > 0 for m in metas)
    # Committed tokens per verify step: tokens generated / verify steps (the first token comes from prefill).
    for m, r in zip(metas, results):
        assert m["spec_accept_length"] == pytest.approx((len(r["output_ids"]) - 1) / m["spec_verify_ct"], rel=0.05,
                                                        abs=0.1)
    assert sum(accept_lengths) / len(accept_lengths) > 1.2, accept_lengths
    assert max(accept_lengths) >= 1.5, accept_lengths

"""Real SGLang (CPU platform) serving tiny Qwen3-VL targets with DFLASH: greedy outputs must equal
non-speculative serving, and the hand-built draft must really get drafts accepted."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_ext.demo.prompts import mixed_requests
from sglang_ext.launcher import draft_args, launch_server
from support.servers import launch_servers, run_concurrently

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


@pytest.fixture(scope="module")
def plain(plain_reference):
    """conftest's session-wide plain greedy outputs; both targets' plain servers start together (nothing to start
    after test_eagle3_serving)."""
    plain_reference.prefetch("dense", "moe")
    return plain_reference


@pytest.fixture(scope="module")
def dflash_runs(tiny, server_log_dir):
    """Both DFLASH servers (dense and MoE target, each with its hand-built draft), started together: per variant,
    the answers to mixed_requests(6, 2) sent one at a time, then all at once."""
    requests = mixed_requests(n_text=6, n_image=2)
    drafts = {"dense": tiny.draft_dense, "moe": tiny.draft_moe}

    def serve(spec):
        return _generate_all(spec, requests), _generate_all(spec, requests, concurrent=True)

    with launch_servers(*(launch_server(getattr(tiny, v), draft_args(d), log_dir=server_log_dir, name=f"dflash-{v}")
                          for v, d in drafts.items())) as servers:
        runs = run_concurrently(*(lambda s=s: serve(s) for s in servers))
    return dict(zip(drafts, runs))


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_dflash_greedy_equals_plain_and_accepts_drafts(plain, dflash_runs, variant):
    # mixed_requests(n_text=6, n_image=2) and a plain server's greedy outputs (session-wide, see conftest)
    requests, expected = plain(variant, MAX_NEW_TOKENS)
    assert requests == mixed_requests(n_text=6, n_image=2)
    results, concurrent = dflash_runs[variant]

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

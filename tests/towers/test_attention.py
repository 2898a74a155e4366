import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade.towers import attention
from cascade.towers.attention import attention_unit, target_attention


def by_definition(unit, q, k, valid):
    """DIN's activation unit as written: the MLP on [q, k, q - k, q * k] for every (query,
    history) pair, the history summed with its weights, padding left out."""
    b, n, length = k.shape[0], q.shape[1], k.shape[1]
    qq = q.expand(b, n, q.shape[-1]).unsqueeze(2).expand(b, n, length, q.shape[-1])
    kk = k.unsqueeze(1).expand(b, n, length, k.shape[-1])
    w = unit(torch.cat([qq, kk, qq - kk, qq * kk], dim=-1)).squeeze(-1) * valid.unsqueeze(1)
    return (w.unsqueeze(-1) * kk).sum(dim=2)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 5), n=st.integers(1, 9), length=st.integers(1, 6), shared=st.booleans(), chunk=st.sampled_from([1, 700, 4000, 1 << 22]), seed=st.integers(0, 1000))
def test_chunked_target_attention_is_the_units_definition(b, n, length, shared, chunk, seed):
    # chunk sizes from one (query, history) pair's bytes upwards: chunked over queries, over
    # rows, or whole; the result must not depend on the chunking
    torch.manual_seed(seed)
    unit = attention_unit(4, [6, 3])
    q = torch.randn(1 if shared else b, n, 4)
    k = torch.randn(b, length, 4)
    valid = torch.rand(b, length) > 0.3
    old = attention.CHUNK_BYTES
    attention.CHUNK_BYTES = chunk
    try:
        got = target_attention(unit, q, k, valid)
    finally:
        attention.CHUNK_BYTES = old
    assert got.shape == (b, n, 4)
    assert torch.allclose(got, by_definition(unit, q, k, valid), atol=1e-5)


def test_chunked_gradients_are_the_whole_ones():
    torch.manual_seed(0)
    unit = attention_unit(4, [6, 3])
    q = torch.randn(3, 5, 4, requires_grad=True)
    k = torch.randn(3, 7, 4, requires_grad=True)
    valid = torch.rand(3, 7) > 0.3
    old = attention.CHUNK_BYTES
    attention.CHUNK_BYTES = 7 * 6 * 4  # one query's pairs a chunk
    try:
        chunked = torch.autograd.grad(target_attention(unit, q, k, valid).square().sum(), [q, k, unit[0][0].weight])
    finally:
        attention.CHUNK_BYTES = old
    whole = torch.autograd.grad(by_definition(unit, q, k, valid).square().sum(), [q, k, unit[0][0].weight])
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, atol=1e-5)

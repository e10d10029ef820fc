"""The shared decoding module on a tiny causal model: cached == uncached, batching == one at a time,
top-k / top-p filtering, beam 1 == greedy, max tokens and stop tokens."""

import torch

from polyformer.backbone import TokenEmbedding, Transformer, TransformerConfig
from polyformer.decoding import Decoder, beam_search, filter_logits, sample

V = 40


def tiny_lm():
    torch.manual_seed(0)
    body = Transformer(TransformerConfig(width=32, heads=4, depth=2, causal=True, dropout=0.0, position="learned"))
    emb = TokenEmbedding(V, 32)
    body.eval()

    def forward(tokens, padding_mask, positions, cache):
        return body(emb(tokens), padding_mask=padding_mask, positions=positions, cache=cache) @ emb.weight.T

    return forward, body.new_cache


PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]


def test_cached_and_uncached_greedy_are_identical():
    fwd, new = tiny_lm()
    cached = sample(Decoder(fwd, new, use_cache=True), PROMPTS, 12, temperature=0)
    uncached = sample(Decoder(fwd, new, use_cache=False), PROMPTS, 12, temperature=0)
    assert cached == uncached
    assert all(len(row) == 12 for row in cached)


def test_batched_left_padded_prompts_equal_one_at_a_time():
    fwd, new = tiny_lm()
    batched = sample(Decoder(fwd, new), PROMPTS, 8, temperature=0)
    alone = [sample(Decoder(fwd, new), [p], 8, temperature=0)[0] for p in PROMPTS]
    assert batched == alone


def test_cached_and_uncached_sampling_are_identical_with_the_same_seed():
    fwd, new = tiny_lm()
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        runs.append(sample(Decoder(fwd, new, use_cache), PROMPTS, 10, temperature=0.9, top_k=8, top_p=0.9, generator=g))
    assert runs[0] == runs[1]


def test_generation_stops_at_eos_and_respects_max_tokens():
    fwd, new = tiny_lm()
    free = sample(Decoder(fwd, new), [[1, 2, 3]], 10, temperature=0)[0]
    eos = free[3]  # make the 4th greedy token the stop token
    stopped = sample(Decoder(fwd, new), [[1, 2, 3]], 10, temperature=0, eos_id=eos)[0]
    assert stopped == free[: free.index(eos)]
    assert sample(Decoder(fwd, new), [[1]], 0, temperature=0) == [[]]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    assert torch.isfinite(filter_logits(logits, top_k=2)[0, :2]).all()
    kept = torch.isfinite(filter_logits(logits, top_p=0.75)[0])
    assert kept.tolist() == [True, True, False, False]  # 0.5 + 0.3 reaches 0.75
    assert torch.isfinite(filter_logits(logits, top_p=0.1)[0]).tolist() == [True, False, False, False]


def test_beam_one_equals_greedy_and_cached_beam_equals_uncached():
    fwd, new = tiny_lm()
    greedy = sample(Decoder(fwd, new), [[1]], 10, temperature=0, eos_id=7)[0]
    assert beam_search(Decoder(fwd, new), 1, bos_id=1, eos_id=7, beam_size=1, max_len=10) == [greedy]
    cached = beam_search(Decoder(fwd, new, True), 1, bos_id=1, eos_id=7, beam_size=4, max_len=10)
    uncached = beam_search(Decoder(fwd, new, False), 1, bos_id=1, eos_id=7, beam_size=4, max_len=10)
    assert cached == uncached

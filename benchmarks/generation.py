"""Decoding speed: the language model's KV-cache sampling and the translation model's beam search, each against
`transformers`' `generate` on a random-weight model of the same size. Both sides produce exactly the same number of
tokens per row (our eos id lies outside the vocabulary; `generate` gets `min_new_tokens`), so the work is identical.

Legend: B batch, P prompt length, S source length, N new tokens, K beams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import SHAPES, Size, gpt2_peer, marian_peer, ours_lm, ours_mt
from .timing import Contender


@dataclass(frozen=True)
class GenShape:
    batch: int
    prompt: int  # LM prompt tokens
    new_tokens: int  # LM new tokens
    source: int  # MT source tokens; the task's default limit gives 1.5 S + 10 target tokens
    beams: int


GEN_SHAPES: dict[Size, GenShape] = {
    "micro": GenShape(batch=2, prompt=4, new_tokens=4, source=4, beams=2),
    "tiny": GenShape(batch=4, prompt=32, new_tokens=64, source=16, beams=4),
    "base": GenShape(batch=8, prompt=128, new_tokens=128, source=64, beams=4),
}


@dataclass
class GenCase:
    kind: str  # "sampling" or "beam search"
    description: str
    tokens: int  # new tokens per call, summed over rows (a row's K beams count once)
    contenders: list[Contender]
    pairs: list[tuple[str, str, str]]


def _no_loss() -> torch.Tensor:
    raise AssertionError("generation contenders are only timed for inference")


def sampling_case(size: Size, device: torch.device, seed: int) -> GenCase:
    s, g = SHAPES["lm"][size], GEN_SHAPES[size]
    if g.prompt + g.new_tokens > s.seq_len:
        raise ValueError(f"prompt {g.prompt} + new tokens {g.new_tokens} exceed the LM context {s.seq_len}")
    torch.manual_seed(seed)
    ours, peer = ours_lm(s, "gelu", device).eval(), gpt2_peer(s, "gelu", device).eval()  # exact GELU both
    prompts = torch.randint(1, s.vocab, (g.batch, g.prompt), generator=torch.Generator().manual_seed(seed))
    prompt_lists, prompts = prompts.tolist(), prompts.to(device)
    attention = torch.ones_like(prompts)
    n = g.new_tokens
    return GenCase(
        "sampling",
        f"d{s.width} L{s.depth} V{s.vocab}, B{g.batch} P{g.prompt} N{n}, top-k 50",
        g.batch * n,
        [
            Contender(
                "polyformer LanguageModel.generate",
                ours,
                _no_loss,
                lambda: ours.generate(prompt_lists, n, temperature=1.0, top_k=50, seed=None),
                ours=True,
            ),
            Contender(
                "transformers generate",
                peer,
                _no_loss,
                lambda: peer.generate(
                    prompts,
                    attention_mask=attention,
                    do_sample=True,
                    top_k=50,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    pad_token_id=0,
                    eos_token_id=0,
                ),
            ),
        ],  # fmt: skip
        [("polyformer LanguageModel.generate", "transformers generate", "KV cache both, exact GELU")],
    )


def beam_case(size: Size, device: torch.device, seed: int) -> GenCase:
    s, g = SHAPES["mt"][size], GEN_SHAPES[size]
    torch.manual_seed(seed)
    ours, peer = ours_mt(s, device).eval(), marian_peer(s, device).eval()
    source = torch.randint(2, s.vocab, (g.batch, g.source), generator=torch.Generator().manual_seed(seed)).to(device)
    d = ours.decoding
    n = int(g.source * d.max_len_a + d.max_len_b)  # the task's own length limit
    return GenCase(
        "beam search",
        f"d{s.width} L{s.depth}+{s.decoder_depth} V{s.vocab}, B{g.batch} S{g.source} N{n}, {g.beams} beams",
        g.batch * n,
        [
            Contender(
                "polyformer Translation.generate", ours, _no_loss, lambda: ours.generate(source, g.beams), ours=True
            ),
            Contender(
                "transformers generate",
                peer,
                _no_loss,
                lambda: peer.generate(
                    source,
                    attention_mask=torch.ones_like(source),
                    num_beams=g.beams,
                    do_sample=False,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    length_penalty=d.length_penalty,
                ),
            ),
        ],  # fmt: skip
        [("polyformer Translation.generate", "transformers generate", "KV cache both; Marian")],
    )


def generation_cases(
    size: Size, device: torch.device, seed: int = 0, tasks: tuple[str, ...] = ("lm", "mt")
) -> list[GenCase]:
    builders = {"lm": sampling_case, "mt": beam_case}
    return [builders[t](size, device, seed) for t in tasks if t in builders]

"""The text-to-text mixture: sampling rates as configured (proportional, temperature, fixed), draws a function of
(seed, epoch, position) alone, DDP ranks dealt disjoint batches of the same epoch, per-task evaluation, local and hub
sources, and an exact mid-epoch resume with span corruption drawn per sample."""

import json
from collections import Counter

import pytest
import torch

from polyformer.data.loading import ResumableLoader
from polyformer.data.text_to_text import MixtureSampler, MixtureTask, TextToTextData, mixture_rates


def test_rates_follow_t5s_formulas():
    sizes = [10000, 1000, 100]
    assert mixture_rates(sizes, "proportional") == pytest.approx([n / 11100 for n in sizes])
    capped = [2000, 1000, 100]  # K = 2000 caps the big task
    assert mixture_rates(sizes, "proportional", size_limit=2000) == pytest.approx([n / 3100 for n in capped])
    powered = [n**0.5 for n in sizes]
    assert mixture_rates(sizes, "temperature", temperature=2.0) == pytest.approx([w / sum(powered) for w in powered])
    assert mixture_rates(sizes, "temperature", temperature=1.0) == pytest.approx(mixture_rates(sizes, "proportional"))
    assert mixture_rates(sizes, "fixed", fixed=[1, 1, 2]) == pytest.approx([0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="rate on every"):
        mixture_rates(sizes, "fixed", fixed=[1, None, 2])


def sampler(rates, sizes=(50, 30, 20), per_epoch=6000, batch_size=8, seed=0) -> MixtureSampler:
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    lengths = [i % 7 + 1 for i in range(sum(sizes))]
    return MixtureSampler(offsets, list(sizes), rates, lengths, per_epoch, batch_size, seed)


def task_of(index: int, sizes=(50, 30, 20)) -> int:
    return 0 if index < sizes[0] else 1 if index < sizes[0] + sizes[1] else 2


@pytest.mark.parametrize("sampling", ["proportional", "temperature", "fixed"])
def test_draws_match_the_configured_rates(sampling):
    rates = mixture_rates([50, 30, 20], sampling, temperature=3.0, fixed=[0.2, 0.2, 0.6])
    s = sampler(rates, per_epoch=20000)
    counts = Counter(task_of(i) for i in s.draws(0))
    assert [counts[t] / 20000 for t in range(3)] == pytest.approx(rates, abs=0.012)
    # A task's pool is used up before any of its examples repeats.
    first = s.draws(0)[:40]
    per_task = Counter(task_of(i) for i in first)
    assert all(Counter(i for i in first if task_of(i) == t).most_common(1)[0][1] == 1
               for t in per_task if per_task[t] <= (50, 30, 20)[t])  # fmt: skip


def test_draws_are_a_function_of_seed_epoch_and_position():
    rates = [0.5, 0.3, 0.2]
    a, b = sampler(rates), sampler(rates)
    assert a.draws(3) == b.draws(3) and a.batches_for(3, 0, 1) == b.batches_for(3, 0, 1)
    assert a.draws(0) != a.draws(1) and a.draws(0) != sampler(rates, seed=1).draws(0)
    # The task of draw p does not depend on other positions or on how long the epoch is.
    shorter = sampler(rates, per_epoch=800)
    assert [shorter.task_of_draw(2, p) for p in range(800)] == [a.task_of_draw(2, p) for p in range(800)]


def test_ddp_ranks_take_disjoint_shares_of_one_epoch():
    s = sampler([0.5, 0.3, 0.2], per_epoch=1000, batch_size=8)
    whole = s.batches_for(1, 0, 1)
    ranks = [s.batches_for(1, r, 2) for r in (0, 1)]
    assert len(whole) == 125 and len(ranks[0]) == len(ranks[1]) == 62  # the same step count on every rank
    assert ranks[0] == whole[0::2][:62] and ranks[1] == whole[1::2][:62]  # dealt in turn: no batch twice
    assert all(len(b) == 8 for r in ranks for b in r)
    # Each rank computes the same epoch: another sampler instance (another process) deals the same batches.
    assert sampler([0.5, 0.3, 0.2], per_epoch=1000, batch_size=8).batches_for(1, 1, 2) == ranks[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t2t")
    rows = [{"source": f"item {i}", "target": f"ITEM {i}"} for i in range(60)]
    (tmp / "upper.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp / "prose.txt").write_text(
        "\n\n".join(f"paragraph {i}: " + "the quick brown fox jumps " * 8 for i in range(300))
    )
    tasks = [
        MixtureTask("fr", "numbers-fr", "translate English to French: ", "bleu", train_size=200, val_size=10,
                    test_size=10),
        MixtureTask("sort", "sort-words", "sort: ", train_size=100, val_size=6, test_size=6),
        MixtureTask("upper", str(tmp / "upper.jsonl"), "upper: "),
        MixtureTask("span", f"span:{tmp / 'prose.txt'}"),
    ]  # fmt: skip
    dm = TextToTextData(tasks, sampling="temperature", temperature=2.0, bpe_vocab_size=400, num_sentinels=20,
                        span_input_length=24, batch_size=8, samples_per_epoch=96)  # fmt: skip
    dm.setup()
    return dm


def test_batches_carry_task_numbers_and_evaluation_covers_every_task(small):
    dm = small
    assert dm.info().tasks == (("fr", "bleu"), ("sort", "exact_match"), ("upper", "exact_match"),
                               ("span", "exact_match"))  # fmt: skip
    assert len(dm.train_dataloader()) == 12
    tok = dm.tokenizer
    seen = set()
    for batch in dm.train_dataloader():
        seen |= set(batch["task"].tolist())
        for row, task in zip(batch["source"], batch["task"].tolist()):
            text = tok.decode(row.tolist())
            prefix = {0: "translate English to French: ", 1: "sort: ", 2: "upper: "}.get(task)
            assert prefix is None or text.startswith(prefix)
    assert seen == {0, 1, 2, 3}
    val = list(dm.val_dataloader())
    counts = Counter(t for b in val for t in b["task"].tolist())
    assert counts[0] == 10 and counts[1] == 6 and counts[2] == 3 and counts[3] >= 1  # jsonl: 5% carved per split
    # Span examples: the input holds sentinels, the target starts with <extra_id_0>.
    span = next(b for b in val if 3 in b["task"].tolist())
    row = span["task"].tolist().index(3)
    sentinel0 = tok.encode("<extra_id_0>")[0]
    assert span["target_in"][row, 1] == sentinel0 and sentinel0 in span["source"][row].tolist()


def test_resume_mid_epoch_loads_the_same_batches_span_corruption_included(small):
    def loader(num_workers: int = 0) -> ResumableLoader:
        return ResumableLoader(small.datasets["train"], None, sampler=small.train_sampler(),
                               collate_fn=small.collate("train"), num_workers=num_workers)  # fmt: skip

    run = loader()
    epochs = [list(run), list(run)]
    assert not all(torch.equal(a["source"], b["source"]) for a, b in zip(*epochs))
    for epoch, k in [(0, 5), (1, 3)]:
        resumed = loader(num_workers=2 if epoch else 0)
        resumed.load_state_dict({"epoch": epoch, "batches_done": k})
        got = list(resumed)
        assert len(got) == len(epochs[epoch]) - k
        for a, b in zip(got, epochs[epoch][k:]):
            assert torch.equal(a["source"], b["source"]) and torch.equal(a["target_out"], b["target_out"])
            assert torch.equal(a["task"], b["task"])


def test_hub_name_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dm = TextToTextData([MixtureTask("x", "someone/not-a-real-dataset-xyz")])
    with pytest.raises(ConnectionError, match="cannot load hub dataset 'someone/not-a-real-dataset-xyz'"):
        dm.setup()


def test_bad_mixture_settings_name_the_value():
    with pytest.raises(ValueError, match="unique"):
        TextToTextData([MixtureTask("a", "dates"), MixtureTask("a", "sort-words")])
    with pytest.raises(ValueError, match="unknown built-in text-to-text task 'nope'"):
        TextToTextData([MixtureTask("a", "nope")]).setup()
    with pytest.raises(ValueError, match="name"):
        MixtureTask("a/b", "dates")

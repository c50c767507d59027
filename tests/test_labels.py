"""Labelling maths: streaming top/sampled contexts, the negative pool, logit lens, firing tokens, labels, detection."""

from __future__ import annotations

import math
import random

import pytest
import torch

from competency_gaps.labels import (
    NegativePool,
    TopContexts,
    clean_token,
    detection_score,
    firing_tokens,
    heuristic_label,
    label_terms,
    lexical_judge,
    promoted_tokens,
    random_keys,
)

# ---------------------------------------------------------------- a hand-built batch
# seq 0: positions 0..4; seq 1: position 2 masked out; seq 2: positions 0..2. Token id = 100 + 10*seq + pos.
SEQ = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
POS = torch.tensor([0, 1, 2, 3, 4, 0, 1, 3, 4, 0, 1, 2])
TOK = 100 + 10 * SEQ + POS


def hand_acts() -> torch.Tensor:
    acts = torch.zeros(12, 3)
    acts[1, 0], acts[3, 0] = 1.0, 2.0  # seq 0: peak at pos 3
    acts[5, 0], acts[8, 0] = 0.5, 3.0  # seq 1: peak at pos 4, next to the masked pos 2
    acts[9, 0] = 2.0  # seq 2: ties seq 0's 2.0, loses on the higher seq
    acts[10, 1] = acts[11, 1] = 0.7  # seq 2, concept 1: a tie inside a sequence goes to the lower position
    return acts  # concept 2 never fires


def rows_of(result: dict) -> list[tuple]:
    return [(c, r, s, p, round(a, 5), tuple(wt), tuple(round(x, 5) for x in wa)) for c, r, s, p, a, wt, wa in zip(
        result["concept"].tolist(), result["rank"].tolist(), result["seq"].tolist(), result["pos"].tolist(),
        result["activation"].tolist(), result["window_tokens"].tolist(), result["window_acts"].tolist())]


def test_top_contexts_hand_case():
    contexts = TopContexts(3, k=2, before=2, after=1)
    contexts.update(hand_acts(), SEQ, POS, TOK)
    result = contexts.result()
    assert result["peak_index"] == 2
    assert rows_of(result) == [
        # concept, rank, seq, pos, activation, window tokens (pos-2 .. pos+1), window activations
        (0, 0, 1, 4, 3.0, (-1, 113, 114, -1), (0.0, 0.0, 3.0, 0.0)),  # pos 2 masked, pos 5 past the end
        (0, 1, 0, 3, 2.0, (101, 102, 103, 104), (1.0, 0.0, 2.0, 0.0)),  # one per sequence: not seq 0's pos 1
        (1, 0, 2, 1, 0.7, (-1, 120, 121, 122), (0.0, 0.0, 0.7, 0.7)),  # before the sequence start: -1
    ]
    assert result["window_tokens"].dtype == torch.long


def test_kth_threshold_admits_only_better_contexts():
    contexts = TopContexts(3, k=2, before=2, after=1)
    contexts.update(hand_acts(), SEQ, POS, TOK)
    one_token = dict(pos_N=torch.tensor([0]), token_ids_N=torch.tensor([7]))
    contexts.update(torch.tensor([[1.5, 0.0, 0.0]]), torch.tensor([3]), **one_token)  # below the k-th (2.0): out
    contexts.update(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([4]), **one_token)  # ties the k-th, higher seq: out
    assert contexts.result()["seq"].tolist() == [1, 0, 2]
    contexts.update(torch.tensor([[2.5, 0.0, 0.5]]), torch.tensor([5]), **one_token)  # beats seq 0; concept 2's first
    result = contexts.result()
    assert list(zip(result["concept"].tolist(), result["seq"].tolist(), result["rank"].tolist())) == [
        (0, 1, 0), (0, 5, 1), (1, 2, 0), (2, 5, 0)]
    assert result["window_tokens"][1].tolist() == [-1, -1, 7, -1]


def random_batch(n_seqs: int, n_concepts: int, seed: int, density: float = 0.3):
    """Sequences of random length with random masked positions; activations from a few values, so ties abound."""
    rng = torch.Generator().manual_seed(seed)
    seqs, poss = [], []
    for s in range(n_seqs):
        length = int(torch.randint(1, 9, (1,), generator=rng))
        kept = torch.nonzero(torch.rand(length, generator=rng) < 0.8).squeeze(1)
        seqs += [s] * len(kept)
        poss += kept.tolist()
    seq, pos = torch.tensor(seqs), torch.tensor(poss)
    values = torch.tensor([0.5, 1.0, 1.5, 2.0])[torch.randint(0, 4, (len(seq), n_concepts), generator=rng)]
    acts = torch.where(torch.rand(len(seq), n_concepts, generator=rng) < density, values, 0.0)
    return acts, seq, pos, 1000 + 10 * seq + pos


def reference_contexts(acts, seq, pos, tok, k, before, after, keys=None) -> list[tuple]:
    """Brute force: best token per (concept, sequence) by (key, activation, -pos), then k best per concept."""
    keys = acts if keys is None else keys
    best = {}
    for n in range(acts.shape[0]):
        for c in range(acts.shape[1]):
            a = float(acts[n, c])
            if a == 0:
                continue
            candidate = (float(keys[n, c]), a, -int(pos[n]), n)
            current = best.get((c, int(seq[n])))
            if current is None or candidate[:3] > current[:3]:
                best[(c, int(seq[n]))] = candidate
    where = {(int(s), int(p)): n for n, (s, p) in enumerate(zip(seq, pos))}
    rows = []
    for c in range(acts.shape[1]):
        ranked = sorted(((-key, s, -negpos, a, n) for (cc, s), (key, a, negpos, n) in best.items() if cc == c))
        for rank, (_, s, p, a, n) in enumerate(ranked[:k]):
            window = [where.get((s, p + o), -1) for o in range(-before, after + 1)]
            rows.append((c, rank, s, p, round(a, 5), tuple(int(tok[i]) if i >= 0 else -1 for i in window),
                         tuple(round(float(acts[i, c]), 5) if i >= 0 else 0.0 for i in window)))
    return rows


def split_by_sequence(acts, seq, pos, tok, n_parts: int, seed: int):
    """The batch cut into n_parts calls of whole sequences, sequences shuffled across calls."""
    order = list(range(int(seq.max()) + 1))
    random.Random(seed).shuffle(order)
    for part in range(n_parts):
        mine = torch.isin(seq, torch.tensor(order[part::n_parts]))
        yield acts[mine], seq[mine], pos[mine], tok[mine]


def test_top_contexts_match_brute_force_however_the_data_is_split():
    acts, seq, pos, tok = random_batch(n_seqs=30, n_concepts=6, seed=1)
    expected = reference_contexts(acts, seq, pos, tok, k=3, before=2, after=2)
    assert len(expected) == 6 * 3

    whole = TopContexts(6, k=3, before=2, after=2)
    whole.update(acts, seq, pos, tok)
    assert rows_of(whole.result()) == expected

    streamed = TopContexts(6, k=3, before=2, after=2)
    for part in split_by_sequence(acts, seq, pos, tok, n_parts=7, seed=2):
        streamed.update(*part)
    assert rows_of(streamed.result()) == expected

    shards = [TopContexts(6, k=3, before=2, after=2) for _ in range(3)]
    for i, part in enumerate(split_by_sequence(acts, seq, pos, tok, n_parts=9, seed=3)):
        shards[i % 3].update(*part)
    shards[0].merge(shards[1])
    shards[0].merge(TopContexts.from_result(shards[2].result(), 6, k=3))  # through a saved result too
    assert rows_of(shards[0].result()) == expected


def test_storage_is_bounded_by_concepts_times_k():
    contexts = TopContexts(5, k=3, before=1, after=1)
    for seed in range(40):
        acts, seq, pos, tok = random_batch(n_seqs=10, n_concepts=5, seed=seed, density=0.6)
        contexts.update(acts, seq + 100 * seed, pos, tok)
        result = contexts.result()
        assert len(result["concept"]) <= 5 * 3
        assert torch.bincount(result["concept"], minlength=5).max() <= 3
        assert all(t.shape[0] == len(result["concept"]) for t in result.values() if isinstance(t, torch.Tensor))
    assert len(result["concept"]) == 15

    # A 65,536-concept SAE: cost follows the non-zeros, storage the concepts.
    wide = TopContexts(65_536, k=2, before=1, after=1)
    gen = torch.Generator().manual_seed(0)
    for batch in range(3):
        acts = torch.zeros(16, 65_536)
        acts.scatter_(1, torch.randint(0, 65_536, (16, 32), generator=gen), torch.rand(16, 32, generator=gen) + 0.1)
        seq = torch.arange(16) // 4 + 4 * batch
        wide.update(acts, seq, torch.arange(16) % 4, torch.arange(16))
    assert wide.n_rows <= 3 * 16 * 32 and torch.bincount(wide.result()["concept"]).max() <= 2


def test_given_key_decides_what_is_kept_but_activation_is_stored():
    acts, seq, pos, tok = random_batch(n_seqs=20, n_concepts=4, seed=5)
    keys = torch.rand(acts.shape, generator=torch.Generator().manual_seed(9))
    contexts = TopContexts(4, k=2, before=1, after=1)
    contexts.update(acts, seq, pos, tok, key_NK=keys)
    expected = reference_contexts(acts, seq, pos, tok, k=2, before=1, after=1, keys=keys)
    assert rows_of(contexts.result()) == expected
    assert expected != reference_contexts(acts, seq, pos, tok, k=2, before=1, after=1)


# ---------------------------------------------------------------- random sample mode


def sampled(acts, seq, pos, tok, seed: int, k: int = 3, n_parts: int = 1) -> dict:
    contexts = TopContexts(acts.shape[1], k=k, before=1, after=1, sample_seed=seed)
    for part in split_by_sequence(acts, seq, pos, tok, n_parts, seed=seed):
        contexts.update(*part)
    return contexts.result()


def test_random_sample_is_deterministic_and_keeps_activating_peaks():
    acts, seq, pos, tok = random_batch(n_seqs=40, n_concepts=5, seed=7)
    first = sampled(acts, seq, pos, tok, seed=11)
    assert rows_of(first) == rows_of(sampled(acts, seq, pos, tok, seed=11, n_parts=6))
    assert first["seq"].tolist() != sampled(acts, seq, pos, tok, seed=12)["seq"].tolist()
    # Kept by the (seq, concept, seed) key; the peak is still the sequence's strongest token for the concept.
    keys = random_keys(seq[:, None], torch.arange(5), seed=11)
    assert rows_of(first) == reference_contexts(acts, seq, pos, tok, k=3, before=1, after=1, keys=keys)
    for c, s, p, a in zip(first["concept"], first["seq"], first["pos"], first["activation"]):
        in_seq = acts[seq == s, c]
        assert a > 0 and a == in_seq.max() and acts[(seq == s) & (pos == p), c].item() == a


def test_random_keys_are_in_unit_interval_and_depend_on_all_inputs():
    keys = random_keys(torch.arange(1000), 3, seed=0)
    assert keys.dtype == torch.float64 and 0 <= keys.min() and keys.max() < 1
    assert keys.unique().numel() == 1000
    assert not torch.equal(keys, random_keys(torch.arange(1000), 4, seed=0))
    assert not torch.equal(keys, random_keys(torch.arange(1000), 3, seed=1))
    assert torch.equal(random_keys(torch.tensor([2**40 + 5]), 3, seed=0), random_keys(torch.tensor([2**40 + 5]), 3, seed=0))
    assert abs(keys.mean().item() - 0.5) < 0.05


def test_random_sample_is_roughly_uniform_over_activating_sequences():
    # 10 sequences, every one activating every concept, the later ones much more strongly: activation ranking
    # would always keep seq 9; the sample must pick each sequence about equally often (k=1, 2000 concepts).
    n_concepts = 2000
    seq = torch.arange(10).repeat_interleave(2)
    pos = torch.arange(2).repeat(10)
    acts = (1.0 + seq.float())[:, None].expand(20, n_concepts).clone()
    chosen = sampled(acts, seq, pos, 100 + seq, seed=3, k=1)["seq"]
    counts = torch.bincount(chosen, minlength=10)
    assert len(chosen) == n_concepts and counts.min() > 140 and counts.max() < 260  # expected 200 each


# ---------------------------------------------------------------- negative pool


def test_negative_pool_bounded_deterministic_and_free_of_the_concept():
    acts, seq, pos, tok = random_batch(n_seqs=60, n_concepts=4, seed=13, density=0.15)
    acts[:, 3] = 1.0  # concept 3 is active everywhere: it has no negatives
    pools = []
    for n_parts in (1, 5):
        pool = NegativePool(size=8, before=2, after=1, seed=4)
        for part in split_by_sequence(acts, seq, pos, tok, n_parts, seed=n_parts):
            pool.update(*part)
            assert len(pool) <= 8
        pools.append(pool)
    assert len(pools[0]) == 8
    assert all(torch.equal(a, b) for a, b in zip(pools[0].result().values(), pools[1].result().values()))

    active_tokens = {c: set(tok[acts[:, c] != 0].tolist()) for c in range(4)}
    for concept in range(3):
        negatives = pools[0].negatives_for(concept, 5)
        assert negatives == pools[1].negatives_for(concept, 5)
        assert 0 < len(negatives) <= 5 and all(window for window in negatives)
        assert not any(set(window) & active_tokens[concept] for window in negatives)
    assert pools[0].negatives_for(3, 5) == []

    other_seed = NegativePool(size=8, before=2, after=1, seed=5)
    other_seed.update(acts, seq, pos, tok)
    assert set(other_seed.result()["seq"].tolist()) != set(pools[0].result()["seq"].tolist())


def test_negative_pool_merge_equals_one_pool():
    acts, seq, pos, tok = random_batch(n_seqs=50, n_concepts=3, seed=17)
    whole = NegativePool(size=6, before=1, after=1, seed=0)
    whole.update(acts, seq, pos, tok)
    halves = [NegativePool(size=6, before=1, after=1, seed=0) for _ in range(2)]
    for i, part in enumerate(split_by_sequence(acts, seq, pos, tok, 4, seed=0)):
        halves[i % 2].update(*part)
    halves[0].merge(NegativePool.from_result(halves[1].result(), size=6, before=1, seed=0))
    assert all(torch.equal(a, b) for a, b in zip(whole.result().values(), halves[0].result().values()))
    # Each window is one of the sequence's tokens and its neighbours, with that sequence's token ids.
    result = whole.result()
    for s, window in zip(result["seq"].tolist(), result["window_tokens"].tolist()):
        assert {t for t in window if t >= 0} <= set(tok[seq == s].tolist()) and window[1] >= 0


# ---------------------------------------------------------------- logit lens and firing tokens


class OnePlusWeightNorm(torch.nn.Module):
    """Gemma-style RMSNorm, x / rms(x) * (1 + w): promoted_tokens must use the module, not assume a form."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


def test_promoted_tokens_hand_case_and_norm_weight():
    W_dec = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]])
    W_U = torch.eye(3)  # logit of token v = normed direction's coordinate v
    plain = torch.nn.RMSNorm(3, eps=0.0)
    ids, logits = promoted_tokens(W_dec, plain, W_U, top=3)
    assert ids.tolist() == [[2, 1, 0], [0, 1, 2]]
    torch.testing.assert_close(logits[0], torch.tensor([3.0, 2.0, 1.0]) / math.sqrt(14 / 3))
    assert promoted_tokens(W_dec, plain, W_U, top=1, largest=False)[0].tolist() == [[0], [2]]

    weighted = torch.nn.RMSNorm(3, eps=0.0)
    with torch.no_grad():
        weighted.weight.copy_(torch.tensor([10.0, 1.0, 1.0]))
    assert promoted_tokens(W_dec, weighted, W_U, top=3)[0].tolist() == [[0, 2, 1], [0, 1, 2]]
    gemma = OnePlusWeightNorm(torch.tensor([9.0, 0.0, 0.0]))
    assert promoted_tokens(W_dec, gemma, W_U, top=3)[0].tolist() == [[0, 2, 1], [0, 1, 2]]


def test_promoted_tokens_chunking_and_the_models_own_norm(tiny_model):
    model, _ = tiny_model
    norm, W_U = model.model.norm, model.lm_head.weight
    W_dec = torch.randn(37, W_U.shape[1], generator=torch.Generator().manual_seed(0))
    ids, logits = promoted_tokens(W_dec, norm, W_U, top=5, chunk=4)
    ids_whole, logits_whole = promoted_tokens(W_dec, norm, W_U, top=5, chunk=1024)
    assert torch.equal(ids, ids_whole)
    torch.testing.assert_close(logits, logits_whole)  # BLAS may round differently per matrix size
    with torch.no_grad():
        expected = model.lm_head(norm(W_dec)).topk(5, dim=1)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(logits, expected.values)


def test_firing_tokens_sum_activation_per_token():
    contexts = TopContexts(3, k=2, before=2, after=1)
    contexts.update(hand_acts(), SEQ, POS, TOK)
    r = contexts.result()
    ids, totals = firing_tokens(r["concept"], r["window_tokens"], r["window_acts"], n_concepts=3, top=2)
    assert ids.tolist() == [[114, 103], [121, 122], [-1, -1]]  # concept 1: a tie goes to the lower id
    torch.testing.assert_close(totals, torch.tensor([[3.0, 2.0], [0.7, 0.7], [0.0, 0.0]]))
    # Summed over windows: the same token firing in two windows outranks one stronger single firing.
    ids, totals = firing_tokens(torch.tensor([0, 0]), torch.tensor([[5, 6], [5, 7]]), torch.tensor([[1.0, 1.5], [1.0, 0.0]]), 1, top=3)
    assert ids.tolist() == [[5, 6, -1]] and totals.tolist() == [[2.0, 1.5, 0.0]]


# ---------------------------------------------------------------- labels and detection scoring


def test_heuristic_label_format():
    assert heuristic_label(["Ġapples", " Pears", "apples", ",", "Ġ"], ["▁fruit", "Fruit", "."]) == '"apples", "Pears" → "fruit"'
    assert heuristic_label(["a", "b", "c"], [], max_words=2) == '"a", "b"'
    assert heuristic_label([], ["Ġfruit"]) == '→ "fruit"'
    assert heuristic_label([",", "Ġ,", "Ċ"], ['"']) == '"," → "\\""'  # punctuation only when nothing else
    assert heuristic_label(["Ċ"], []) == '"\\n"'
    assert heuristic_label([], []) == ""
    assert label_terms('"apples", "Pears" → "\\"", "\\n"') == ["apples", "Pears", '"', "\n"]
    assert clean_token("ĠApples ") == "Apples" and clean_token("Ċ") == "\n"


def test_lexical_judge_whole_token_case_insensitive():
    assert lexical_judge(["apples"], ["Janet", "Ġhas", "ĠApples"])
    assert not lexical_judge(["apple"], ["Janet", "Ġhas", "Ġapples"])  # whole tokens, not substrings
    assert lexical_judge(["\n"], ["a", "Ċ"]) and not lexical_judge(["\n"], ["a", "b"])


def test_detection_score_balanced_accuracy():
    truth = [True, True, True, False]
    assert detection_score(truth, truth) == 1.0
    assert detection_score([False] * 4, truth) == 0.5  # a label matching nothing
    assert detection_score([True] * 4, truth) == 0.5  # a label matching everything
    assert detection_score([not t for t in truth], truth) == 0.0
    assert detection_score([True, False, False, False], truth) == pytest.approx((1 / 3 + 1) / 2)
    assert math.isnan(detection_score([True], [True]))
    with pytest.raises(ValueError):
        detection_score([True], [True, False])


def test_detection_with_the_lexical_judge_end_to_end():
    positives = [["Ġthree", "Ġapples"], ["ĠApples", "Ġare"]]
    negatives = [["Ġthe", "Ġdoctor"], ["Ġpears", "."]]
    truth = [True] * 2 + [False] * 2

    def score(label: str) -> float:
        return detection_score([lexical_judge(label_terms(label), ctx) for ctx in positives + negatives], truth)

    assert score(heuristic_label(["Ġapples"], [])) == 1.0
    assert score(heuristic_label(["Ġzebra"], [])) == 0.5
    assert score(heuristic_label(["Ġdoctor", "Ġpears"], [])) == 0.0


# ---------------------------------------------------------------- the same on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cuda = torch.device("cuda")
    acts, seq, pos, tok = random_batch(n_seqs=40, n_concepts=6, seed=23)
    for seed in (None, 5):
        on_cpu, on_gpu = TopContexts(6, k=3, sample_seed=seed), TopContexts(6, k=3, sample_seed=seed)
        for part in split_by_sequence(acts, seq, pos, tok, 4, seed=1):
            on_cpu.update(*part)
            on_gpu.update(*(t.to(cuda) for t in part))
        assert on_gpu.device.type == "cuda" and on_gpu._rows["concept"].is_cuda
        assert rows_of(on_gpu.result()) == rows_of(on_cpu.result())
    pool_cpu, pool_gpu = NegativePool(size=5, seed=1), NegativePool(size=5, seed=1)
    pool_cpu.update(acts, seq, pos, tok)
    pool_gpu.update(*(t.to(cuda) for t in (acts, seq, pos, tok)))
    assert all(torch.equal(a, b) for a, b in zip(pool_cpu.result().values(), pool_gpu.result().values()))
    assert pool_gpu.negatives_for(0, 3) == pool_cpu.negatives_for(0, 3)
    W_dec, W_U = torch.randn(50, 16), torch.randn(70, 16)
    norm = torch.nn.RMSNorm(16)
    ids, _ = promoted_tokens(W_dec.to(cuda), norm.to(cuda), W_U.to(cuda), top=4, chunk=7)
    assert ids.is_cuda and torch.equal(ids.cpu(), promoted_tokens(W_dec, norm.cpu(), W_U, top=4)[0])


def test_token_text_shows_the_bytes_of_a_partial_character(tiny_model):
    """A byte-level token holding the first byte of "é" (0xC3) decodes alone to U+FFFD; contexts and labels show
    "<0xC3>" instead (as SentencePiece's byte fallback names it), while whole tokens read as they decode."""
    from competency_gaps.concept_labels import TokenText, bytes_text, partial_character_text

    _, tokenizer = tiny_model
    text = TokenText(tokenizer)
    partial = tokenizer.convert_tokens_to_ids("Ã")  # byte-level BPE's character for the byte 0xC3
    assert tokenizer.decode([partial]) == "\ufffd"
    assert text(partial) == "<0xC3>"
    whole = tokenizer("cat", add_special_tokens=False)["input_ids"][0]
    assert text(whole) == tokenizer.decode([whole]) and "<0x" not in text(whole)
    assert bytes_text(" caf\xc3".encode("latin-1")) == " caf<0xC3>"
    assert bytes_text("é".encode() + b"\xe6\x97") == "é<0xE6><0x97>"
    assert partial_character_text("<0xE6>") == "<0xE6>"
    assert partial_character_text("▁word") is None


def test_loose_bytes_make_a_label_only_when_nothing_else_does():
    assert heuristic_label(["<0xE6><0x97>", "apple"], ["<0xC3>", "fruit"]) == '"apple" → "fruit"'
    assert heuristic_label(["<0xE6>", "!"], []) == '"!"'
    assert heuristic_label(["<0xE6>", " "], []) == '"<0xE6>"'

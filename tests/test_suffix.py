"""Suffix decoding (engine/suffix.py): the index finds what a search of every stored sequence
finds; the proposer learns from the row's own text and from the job's finished rows; the mode is
token-identical to the target alone, greedy (fbs 1 and 4, fixed and adaptive k) and sampled. Each
test runs on both indexes, the compiled one (engine/suffix_native.py, where it builds) and the
pure-Python one, and the two propose the same on random streams."""

import numpy as np
import pytest
from engine_world import EOS, PROMPTS, REFERENCE, engine
from sampling_world import chi2_pvalue, exact_distribution, run_engine
from tiny import VOCAB

from spd_cluster.engine import SpDEngine, SpDSettings
from spd_cluster.engine import suffix as sfx
from spd_cluster.engine import suffix_native
from spd_cluster.engine.suffix import SuffixIndex, SuffixProposer

NATIVE = suffix_native.extension()  # None where it does not build (then the pure-Python index alone)
IMPLS = ["python"] + (["native"] if NATIVE is not None else [])


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """The index implementation of the test (the process's choice, engine/suffix.py: native)."""
    monkeypatch.setattr(sfx, "_NATIVE", NATIVE if request.param == "native" else False)
    assert (sfx.native() is not None) == (request.param == "native")
    return request.param


def new_index(max_depth, max_rows=None):
    return sfx.new_index(max_depth, max_rows)
from spd_cluster.sessions.base import check_inputs, keep_index

# -- the index against a brute-force search ----------------------------------------------------


def search(seqs, ctx, limit, factor, min_prob, max_depth):
    """Every occurrence of every suffix of ``ctx`` in ``seqs`` ((tokens, start) each: an
    occurrence ends at j with a next token at j + 1 >= start), the longest kept; then the most
    frequent next token among them (the latest on a tie), and so on, as the module says."""
    occs = [(i, j) for i, (s, st) in enumerate(seqs) for j in range(max(st - 1, 0), len(s) - 1)]

    def matched(i, j):
        s, n = seqs[i][0], 0
        while n < min(max_depth, len(ctx)) and j - n >= 0 and s[j - n] == ctx[-1 - n]:
            n += 1
        return n

    best = max((matched(i, j) for i, j in occs), default=0)
    if best == 0 or limit <= 0:
        return [], []
    cands = [o for o in occs if matched(*o) >= best]
    cap = min(limit, int(factor * best + 1e-6))
    out, probs, prob, d = [], [], 1.0, 1
    while len(out) < cap:
        nxt = [(seqs[i][0][j + d], (i, j)) for i, j in cands if j + d < len(seqs[i][0])]
        if not nxt:
            break
        counts = {}
        for t, _ in nxt:
            counts[t] = counts.get(t, 0) + 1
        top = max(counts.values())
        t = max((t for t in counts if counts[t] == top), key=lambda t: max(o for u, o in nxt if u == t))
        if prob * top / len(nxt) < min_prob:
            break
        prob *= top / len(nxt)
        out.append(t)
        probs.append(prob)
        cands = [o for u, o in nxt if u == t]
        d += 1
    return out, probs


@pytest.fixture
def every_occurrence(monkeypatch):
    monkeypatch.setattr(sfx, "RECENT", 10**9)  # the reference reads every occurrence


@pytest.mark.parametrize("seed", range(4))
def test_index_proposes_what_a_search_of_every_sequence_proposes(seed, impl, every_occurrence):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        vocab, depth = int(rng.integers(2, 6)), int(rng.integers(1, 12))
        index, seqs = new_index(depth), []
        for _ in range(int(rng.integers(1, 5))):
            s, start = rng.integers(0, vocab, int(rng.integers(1, 40))).tolist(), int(rng.integers(0, 4))
            index.add(s, start)
            if len(s) > start:
                seqs.append((s, start))
        ctx = rng.integers(0, vocab, int(rng.integers(1, 14))).tolist()
        limit, factor = int(rng.integers(0, 9)), float(rng.choice([0.5, 1.0, 2.0]))
        min_prob = float(rng.choice([0.0, 0.1, 0.3]))
        d = index.draft(ctx, limit, factor, min_prob)
        want, probs = search(seqs, ctx, limit, factor, min_prob, depth)
        assert d.tokens == want
        np.testing.assert_allclose(d.probs, probs)


def test_a_growing_row_proposes_what_a_search_of_its_text_proposes(impl, every_occurrence):
    rng = np.random.default_rng(7)
    for _ in range(40):
        seq = rng.integers(0, 4, 150)
        index = new_index(10)
        n = int(rng.integers(1, 8))
        index.open(seq[:n])
        while n <= len(seq):
            index.extend(seq[:n])  # rows grow by 1..k + 1 tokens a step
            ctx = seq[max(0, n - 10):n].tolist()
            # the row's own occurrences: n-grams that end before its last token
            want, _ = search([(seq[:n].tolist(), 0)], ctx, 6, 1.0, 0.1, 10)
            assert index.draft(ctx, 6, 1.0, 0.1).tokens == want
            n += int(rng.integers(1, 5))


def test_the_oldest_rows_go_first_and_the_index_stays_bounded(impl, every_occurrence):
    rng = np.random.default_rng(3)
    index = new_index(8, max_rows=5)
    rows = [rng.integers(0, 50, 30).tolist() for _ in range(40)]
    for i, r in enumerate(rows):
        index.add(r)
        kept = rows[max(0, i - 4): i + 1]
        assert len(index) == len(kept) and index.num_tokens == sum(map(len, kept))
        assert len(index.toks) == sum(len(r) + 1 for r in kept)  # tokens and one SEP a row
        ctx = rows[i - 6][:5] if i >= 6 else rows[0][:5]  # a dropped row's start: proposed only while kept
        want, _ = search([(r, 0) for r in kept], ctx, 4, 1.0, 0.0, 8)
        assert index.draft(ctx, 4, 1.0, 0.0).tokens == want
    assert index.num_keys() <= 5 * 30 * len(sfx.KEY_LENS)  # keys of dropped rows are gone


def test_a_look_up_reads_the_latest_occurrences_only(impl):
    index = new_index(4)
    for i in range(100):
        index.add([5, 6, 7, i % 50 + 10])  # [5, 6, 7] then a different token each time
    cands, n = index.match([5, 6, 7])
    assert n == 3 and len(cands) == sfx.RECENT
    toks, base = index.toks, index.base
    assert [toks[p - base + 1] for p in cands] == [i % 50 + 10 for i in range(100 - sfx.RECENT, 100)]


def fresh(seqs, ctx, limit, factor, min_prob, max_depth):
    """The module's look-up from scratch, over every stored sequence ((tokens, start) each, in
    storage order): the longest n-gram of KEY_LENS ending ``ctx`` that occurred with a next token,
    its latest RECENT occurrences, those of them that match ``ctx`` deepest (up to max_depth, and
    short of the next key length where that key missed), then token by token the most frequent
    next token (the most recent on a tie) while the running frequency stays >= min_prob."""
    ctx = ctx[-max_depth:]
    if limit <= 0 or not ctx:
        return [], []
    occs = [(s, e) for s, st in seqs for e in range(max(st - 1, 0), len(s) - 1)]

    def depth(s, e, most):
        n = 0
        while n < most and e - n >= 0 and s[e - n] == ctx[-1 - n]:
            n += 1
        return n

    lens = [n for n in sfx.KEY_LENS if n <= len(ctx)]
    for k in range(len(lens) - 1, -1, -1):
        hits = [o for o in occs if depth(*o, lens[k]) == lens[k]]
        if hits:
            break
    else:
        return [], []
    longer = sfx.KEY_LENS.index(lens[k]) + 1
    most = min(len(ctx), sfx.KEY_LENS[longer] - 1) if longer < len(sfx.KEY_LENS) else len(ctx)
    window = hits[-sfx.RECENT:]
    deepest = max(depth(*o, most) for o in window)
    alive = [s[e + 1 : e + 1 + min(limit, int(factor * deepest + 1e-6))]
             for s, e in reversed(window) if depth(s, e, most) == deepest]  # the most recent first
    out, probs, prob = [], [], 1.0
    for j in range(len(max(alive, key=len))):
        col = [c[j] for c in alive if len(c) > j]
        if not col:
            break
        top = max(col.count(t) for t in col)
        best = next(t for t in col if col.count(t) == top)
        prob *= top / len(col)
        if prob < min_prob:
            break
        out.append(best)
        probs.append(prob)
        alive = [c for c in alive if len(c) > j and c[j] == best]
    return out, probs


@pytest.mark.parametrize("seed", range(3))
def test_rows_step_by_step_propose_what_a_fresh_look_up_proposes(seed, impl):
    """The proposer's indexes grow a few tokens a step (and the job's drops its oldest rows); at
    every step each row's proposal is what a look-up from scratch over the row's text so far and
    the job's kept rows proposes (the row's on a tie). Token streams of a few motifs over a small
    vocabulary: keys with more than RECENT occurrences, long matches, several continuations."""
    rng = np.random.default_rng(seed)
    depth, keep = int(rng.choice([5, 8, 24])), 3
    p = SuffixProposer(max_depth=depth, max_spec_factor=2.0, min_prob=0.1, cache_rows=keep)
    assert (p.native is not None) == (impl == "native")
    job: list = []

    def stream():
        vocab = int(rng.integers(3, 8))
        motifs = [rng.integers(0, vocab, int(rng.integers(2, 9))).tolist() for _ in range(3)]
        out = []
        while len(out) < 200:
            out += motifs[int(rng.integers(3))] if rng.random() < 0.8 else rng.integers(0, vocab, 3).tolist()
        return out, int(rng.integers(1, 60))

    rows = {}  # slot -> (tokens, prompt length, tokens so far)
    started = 0
    while started < 8 or rows:
        for slot in (0, 1):
            if slot not in rows and started < 8:
                toks, plen = stream()
                p.start(slot, np.array(toks[:plen]))
                rows[slot] = [toks, plen, plen]
                started += 1
        slots = sorted(rows)
        limits = [int(rng.integers(0, 9)) for _ in slots]
        got = p.propose(slots, [np.array(rows[s][0][: rows[s][2]]) for s in slots], limits).tokens
        for slot, limit, proposal in zip(slots, limits, got):
            toks, plen, n = rows[slot]
            ctx = toks[max(0, n - depth) : n]
            own = fresh([(toks[:n], 0)], ctx, limit, 2.0, 0.1, depth)
            other = fresh(job, ctx, limit, 2.0, 0.1, depth)
            assert proposal.tolist() == (own if sum(own[1]) >= sum(other[1]) else other)[0]
            d = p.rows[slot].draft(ctx, limit, 2.0, 0.1)
            assert (d.tokens, d.probs) == own
            rows[slot][2] += int(rng.integers(1, 6))
        for slot in slots:  # rows that are done join the job's index, after this step's proposals
            toks, plen, n = rows[slot]
            if n >= len(toks):
                p.finish(slot, np.array(toks))
                tail = min(plen, depth)
                job = (job + [(toks[plen - tail :], tail)])[-keep:]
                del rows[slot]


def motif_stream(rng, n, vocab, motifs):
    """Tokens from a few motifs (repeats: keys with more than RECENT occurrences, long matches),
    now and then a random run (several continuations)."""
    out = []
    while len(out) < n:
        out += motifs[int(rng.integers(len(motifs)))] if rng.random() < 0.8 else rng.integers(0, vocab, 3).tolist()
    return out[:n]


@pytest.mark.skipif(NATIVE is None, reason="the compiled index does not build here")
@pytest.mark.parametrize("seed", range(6))
def test_the_compiled_index_proposes_what_the_python_one_proposes(seed):
    """Both indexes fed the same: a job index that drops its oldest rows (rows with a context
    prefix, start > 0) and a row growing a few tokens a step; every look-up (match, draft) and
    what they hold agree, and two proposers, one on each, propose and count the same."""
    rng = np.random.default_rng(100 + seed)
    top = [8, 50, 2**21 - 1][seed % 3]  # ids up to the largest a key packs apart
    vocab = rng.choice(np.arange(top - 7, top + 1) if top > 50 else np.arange(top), int(rng.integers(3, 8)),
                       replace=False).tolist()
    motifs = [[vocab[i] for i in rng.integers(0, len(vocab), int(rng.integers(2, 9)))] for _ in range(4)]

    def stream(n):
        return [vocab[t % len(vocab)] for t in motif_stream(rng, n, len(vocab), [[vocab.index(t) for t in m]
                                                                                  for m in motifs])]

    depth = int(rng.choice([4, 8, 24]))
    py_job, c_job = SuffixIndex(depth, max_rows=4), suffix_native.NativeSuffixIndex(depth, max_rows=4, recent=sfx.RECENT)
    for r in range(14):
        toks, start = stream(int(rng.integers(5, 120))), int(rng.integers(0, 10))
        py_job.add(toks, start)
        c_job.add(np.array(toks), start)
        assert (len(c_job), c_job.num_tokens, c_job.base, c_job.toks) == (len(py_job), py_job.num_tokens,
                                                                         py_job.base, py_job.toks)
        assert c_job.num_keys() == py_job.num_keys()
        seq = stream(160)
        n = int(rng.integers(1, 30))
        py_row, c_row = SuffixIndex(depth), suffix_native.NativeSuffixIndex(depth, recent=sfx.RECENT)
        py_row.open(seq[:n])
        c_row.open(np.array(seq[:n]))
        while n < len(seq):
            n = min(len(seq), n + int(rng.integers(1, 6)))
            ctx = py_row.grow(np.array(seq[:n]), depth)
            assert c_row.grow(np.array(seq[:n]), depth) == ctx
            limit, factor = int(rng.integers(0, 12)), float(rng.choice([0.5, 1.0, 2.0, 3.0]))
            min_prob = float(rng.choice([0.0, 0.1, 0.3]))
            for a, b in ((py_row, c_row), (py_job, c_job)):
                assert b.match(ctx) == a.match(ctx)
                da, db = a.draft(ctx, limit, factor, min_prob), b.draft(ctx, limit, factor, min_prob)
                assert (db.tokens, db.probs, db.score, db.match_len) == (da.tokens, da.probs, da.score, da.match_len)
        assert c_row.toks == py_row.toks and c_row.num_keys() == py_row.num_keys()

    # the proposers, step by step over two slots, rows finishing into a job index of 3
    procs = {}
    for name, ext in (("python", False), ("native", NATIVE)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sfx, "_NATIVE", ext)
            procs[name] = SuffixProposer(max_depth=depth, max_spec_factor=2.0, min_prob=0.1, cache_rows=3)
    assert procs["python"].native is None and procs["native"].native is not None
    rows, started = {}, 0
    while started < 10 or rows:
        for slot in (0, 1):
            if slot not in rows and started < 10:
                toks, plen = stream(int(rng.integers(40, 200))), int(rng.integers(1, 30))
                for p in procs.values():
                    p.start(slot, np.array(toks[:plen]))
                rows[slot], started = [toks, plen, plen], started + 1
        slots = sorted(rows)
        limits = [int(rng.integers(0, 9)) for _ in slots]
        seqs = [np.array(rows[s][0][: rows[s][2]]) for s in slots]
        got = {name: [t.tolist() for t in p.propose(slots, seqs, limits).tokens] for name, p in procs.items()}
        assert got["native"] == got["python"]
        verified = type("Verified", (), {"accepted": rng.integers(0, 3, len(slots))})()
        for p in procs.values():
            p.learn(slots, verified)
        for s in slots:
            rows[s][2] = min(len(rows[s][0]), rows[s][2] + int(rng.integers(1, 6)))
            toks, plen, n = rows[s]
            if n >= len(toks):
                for p in procs.values():
                    p.finish(s, np.array(toks))
                del rows[s]
    assert procs["native"].take_stats() == procs["python"].take_stats()
    assert procs["native"].take_finished() == procs["python"].take_finished()
    assert procs["native"].job.toks == procs["python"].job.toks and len(procs["native"].job) == 3


def test_a_proposal_stops_where_its_probability_falls_and_grows_with_the_match(impl):
    index = new_index(16)
    for tail in ([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 8, 8]):
        index.add([20, 21, 22, 23] + tail)
    d = index.draft([20, 21, 22, 23], 8, max_spec_factor=2.0, min_prob=0.5)
    assert d.tokens == [1, 2, 3, 4] and d.match_len == 4  # 3 follows in 3 of 4, then 4 in 2 of 3
    np.testing.assert_allclose(d.probs, [1.0, 1.0, 0.75, 0.5])
    assert index.draft([20, 21, 22, 23], 8, max_spec_factor=2.0, min_prob=0.6).tokens == [1, 2, 3]
    assert index.draft([23], 8, max_spec_factor=2.0, min_prob=0.0).tokens == [1, 2]  # a 1-token match: 2 tokens


def test_a_finished_row_is_context_for_its_output_only(impl):
    p = SuffixProposer(max_depth=8, cache_rows=10)
    p.start(0, np.array([40, 41, 42, 43]))
    p.finish(0, np.array([40, 41, 42, 43, 50, 51, 52]))  # output [50, 51, 52] after the prompt
    p.start(1, np.array([7, 42, 43]))
    # the prompt's end leads into the output; nothing is proposed from inside the other prompt
    assert p.propose([1], [np.array([7, 42, 43])], [4]).tokens[0].tolist() == [50, 51]
    assert p.propose([1], [np.array([7, 42, 43, 40, 41])], [4]).tokens[0].tolist() == []
    assert p.take_finished() == [[4, 40, 41, 42, 43, 50, 51, 52]]
    q = SuffixProposer(max_depth=8)
    q.add_rows([[4, 40, 41, 42, 43, 50, 51, 52]])  # another pair's row
    q.start(0, np.array([1, 43, 50]))
    assert q.propose([0], [np.array([1, 43, 50])], [4]).tokens[0].tolist() == [51, 52]


# -- a target whose outputs follow one template ------------------------------------------------

MARK = 3  # the last token of every templated prompt
TEMPLATE = [10, 11, 12, 13, 14, -1, 15, 16, 17, 18, 19, 20, -1, -1, 21, 22, 23, 24, 25, -1, 26, 27, 28, 29, 10, 12, -1,
            14, 16, 18, 20]


class TemplateSession:
    """The session contract over a scripted target: after a prompt [1, key, ..., MARK], its greedy
    output is TEMPLATE, with each -1 a value of the prompt's own (from its key), then EOS. Like
    a batch of records turned into JSON with fixed keys."""

    def __init__(self, full_batch_size, ctx_len):
        self.full_batch_size, self.ctx_len, self.vocab_size, self.num_heads = full_batch_size, ctx_len, VOCAB, 0
        self.eos_token_ids = [EOS]
        self.hist = np.zeros((full_batch_size, ctx_len), np.int64)

    def next_token(self, slot, pos):
        h = self.hist[slot, : pos + 1]
        marks = np.flatnonzero(h == MARK)
        i = pos - int(marks[-1]) if marks.size else len(TEMPLATE)  # output tokens so far (none: adaptive k's timing)
        if i >= len(TEMPLATE):
            return EOS
        return TEMPLATE[i] if TEMPLATE[i] >= 0 else 30 + (int(h[1]) * 7 + i * 13) % 60

    def run(self, inputs):
        c = check_inputs(inputs, self.full_batch_size, self.ctx_len)
        for r, slot in enumerate(c.batch_index):
            ok = c.position_ids[r] >= 0
            self.hist[slot, c.position_ids[r][ok]] = c.input_ids[r][ok]
        cols = keep_index(c.position_ids, c.num_logits)
        tokens = np.array([[self.next_token(slot, c.position_ids[r, j]) for j in cols[r]]
                           for r, slot in enumerate(c.batch_index)], dtype=np.int64)
        if c.argmax:
            return {"tokens": tokens}
        return {"logits": np.where(np.arange(VOCAB) == tokens[..., None], 10.0, 0.0).astype(np.float32)}


def templated(n, seed=0):
    g = np.random.default_rng(seed)
    return [[1, int(g.integers(4, 90))] + g.integers(4, 90, 3).tolist() + [MARK] for _ in range(n)]


def run_templated(mode, prompts, fbs=1, **kw):
    s = SpDSettings(num_speculative_tokens=kw.pop("k", 8), prefill_seq_len=8, ctx_len=64, max_new_tokens=40,
                    full_batch_size=fbs, **kw)
    return SpDEngine(mode, TemplateSession(fbs, 64), None, s, eos_token_ids=[EOS]).generate(prompts)


def test_templated_rows_accept_the_job_s_proposals_and_more_as_the_job_goes_on(impl):
    prompts = templated(16)
    base = run_templated("baseline", prompts)
    info = run_templated("suffix", prompts, adaptive_k=False)
    assert [x.tolist() for x in info.generated_ids] == [x.tolist() for x in base.generated_ids]
    m = info.perf_metrics
    per_row = [r.mean_num_accepted_tokens for r in info.results]
    assert np.mean(per_row[8:]) > np.mean(per_row[:8]) and np.mean(per_row[8:]) > 1.8
    assert m.suffix_accepted_job > m.suffix_accepted_row and m.suffix_steps_job > 0
    # the counts by source add up to the per-position counts
    assert m.suffix_accepted_row + m.suffix_accepted_job == sum(m.accepted_per_position)
    assert m.suffix_steps_row + m.suffix_steps_job <= m.num_row_steps
    # without the job-wide index the rows have only their own text
    alone = run_templated("suffix", prompts, adaptive_k=False, suffix_cache_rows=0).perf_metrics
    assert alone.suffix_steps_job == 0 and alone.mean_num_accepted_tokens < m.mean_num_accepted_tokens
    # pld has the row's own text only as well
    assert run_templated("pld", prompts, adaptive_k=False).perf_metrics.mean_num_accepted_tokens < m.mean_num_accepted_tokens


@pytest.mark.parametrize("fbs", [1, 4])
def test_another_pair_s_rows_help_from_the_first_row(fbs, impl):
    prompts = templated(8, seed=1)
    first = SpDEngine("suffix", TemplateSession(fbs, 64), None,
                      SpDSettings(num_speculative_tokens=8, prefill_seq_len=8, ctx_len=64, max_new_tokens=40,
                                  full_batch_size=fbs, adaptive_k=False), eos_token_ids=[EOS])
    first.generate(templated(8, seed=2))
    rows = first.proposer.take_finished()
    assert len(rows) == 8
    fresh = run_templated("suffix", prompts[:1], fbs=fbs, adaptive_k=False).perf_metrics
    second = SpDEngine("suffix", TemplateSession(fbs, 64), None, first.settings, eos_token_ids=[EOS])
    second.proposer.add_rows(rows)
    warm = second.generate(prompts[:1]).perf_metrics
    assert warm.mean_num_accepted_tokens > fresh.mean_num_accepted_tokens and warm.suffix_accepted_job > 0


# -- token-identical to the target alone -------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("fbs", [1, 4])
def test_lossless_against_hf_generate(fbs, k, adaptive, impl):
    info = engine("suffix", k, fbs, adaptive_k=adaptive, suffix_max_spec_factor=2.0).generate(PROMPTS + PROMPTS)
    assert [ids.tolist() for ids in info.generated_ids] == REFERENCE + REFERENCE
    m = info.perf_metrics
    assert m.suffix_steps_row > 0 and m.suffix_steps_job > 0  # both indexes proposed
    if not adaptive:  # (adaptive k may keep none of them, from the step costs it measured)
        assert m.suffix_accepted_row > 0 and m.suffix_accepted_job > 0


@pytest.mark.parametrize("fbs", [1, 4])
def test_templated_lossless_with_adaptive_k(fbs, impl):
    prompts = templated(12, seed=5)
    base = run_templated("baseline", prompts, fbs=fbs)
    info = run_templated("suffix", prompts, fbs=fbs)
    assert [x.tolist() for x in info.generated_ids] == [x.tolist() for x in base.generated_ids]
    assert info.perf_metrics.mean_num_accepted_tokens > 1.3


@pytest.mark.slow
def test_sampled_suffix_keeps_the_target_distribution(impl):
    temperature, top_k, n_tokens = 0.9, 6, 3
    probs = exact_distribution(n_tokens, temperature, top_k, 1.0)
    info = run_engine("suffix", 2000, n_tokens, 16, temperature=temperature, top_k=top_k, seed=5)
    counts = {}
    for ids in info.generated_ids:
        counts[tuple(ids.tolist())] = counts.get(tuple(ids.tolist()), 0) + 1
    assert chi2_pvalue(counts, probs) > 0.01
    m = info.perf_metrics
    assert 0 < m.accepted_per_position[0] < m.proposed_per_position[0]  # proposals, some rejected


def test_sampled_templated_text_is_the_target_s(impl):
    """Point-mass proposals at temperature > 0: the job index's proposals are accepted where the
    target's own draw agrees (here a target that puts all its mass on one token)."""
    prompts = templated(10, seed=9)
    base = run_templated("baseline", prompts, temperature=0.8, seed=1)
    info = run_templated("suffix", prompts, temperature=0.8, seed=1)
    assert [x.tolist() for x in info.generated_ids] == [x.tolist() for x in base.generated_ids]
    assert info.perf_metrics.suffix_accepted_job > 0


# -- the job-wide index across pairs (cluster/suffix_cache.py) ---------------------------------


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class FakeCache:
    """The cache actor in process: its methods answered at once (ray.get is the identity here)."""

    def __init__(self, max_rows=10):
        from spd_cluster.cluster.suffix_cache import SuffixCache

        self.actor = SuffixCache(max_rows)
        self.pull, self.push = _Remote(self.actor.pull), _Remote(self.actor.push)


def test_pairs_send_their_finished_rows_at_a_shard_s_end_and_take_the_others_at_its_start(monkeypatch, impl):
    import ray

    from spd_cluster.cluster import suffix_cache

    cache = FakeCache(max_rows=3)
    monkeypatch.setattr(suffix_cache, "_cache", lambda: cache)
    monkeypatch.setattr(ray, "get", lambda x: x)
    a, b = (SpDEngine("suffix", TemplateSession(1, 64), None, SpDSettings(prefill_seq_len=8, ctx_len=64,
                                                                         full_batch_size=1), eos_token_ids=[EOS])
            for _ in range(2))
    assert suffix_cache.pull(a, 0) == 0
    a.generate(templated(2, seed=3))
    assert suffix_cache.push(a, 0) == 2 and suffix_cache.push(a, 0) == 0  # each row sent once
    assert suffix_cache.pull(a, 0) == 0  # a pair never takes its own rows back
    assert suffix_cache.pull(b, 1) == 2 and len(b.proposer.job) == 2
    b.generate(templated(2, seed=4))
    suffix_cache.push(b, 1)
    assert suffix_cache.pull(a, 0) == 2 and suffix_cache.pull(b, 1) == 0
    assert cache.actor.size() == 3  # bounded: the oldest row went
    # a mode without a job index, or no cache in the job, costs nothing
    assert suffix_cache.pull(engine("pld", 3, 1), 0) == 0
    monkeypatch.setattr(suffix_cache, "_cache", lambda: None)
    assert suffix_cache.push(b, 1) == 0


@pytest.mark.slow
def test_a_suffix_job_on_ray_is_the_target_s_text_and_a_resume_starts_from_its_results(tiny, local_ray, tmp_path):
    import pandas as pd
    from helpers import make_cfg, reference, results, write_jsonl

    from spd_cluster.cluster.coordinator import run_job
    from spd_cluster.cluster.suffix_cache import SuffixCache
    from spd_cluster.io import fs

    rows = [{"id": f"r{i}", "prompt": f"name: {n}; city: {c}; to json"} for i, (n, c) in
            enumerate(zip(["ann", "bob", "cy", "dee", "ed", "flo", "gus", "hal"], ["rome", "oslo", "lima"] * 3))]
    ds = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    cfg = make_cfg(tiny, ds, out, mode="suffix", **{"cluster.shard_size": 2, "spd.adaptive_k": "false"})
    res = run_job(cfg, progress=False)
    assert res.status == "completed" and res.shards_run == 4
    df = results(out)
    assert {r: list(g) for r, g in zip(df.row, df.generated_ids)} == reference(tiny, make_cfg(tiny, ds, out, mode="baseline"))
    shards = pd.read_parquet(out / "shards.parquet")
    for col in SuffixProposer.STATS:
        assert col in shards.columns
    assert shards.suffix_steps_row.sum() + shards.suffix_steps_job.sum() > 0
    # a resumed job's cache starts from the outputs written
    cache = SuffixCache(100, fs.resolve(str(out)), shard_ids=[0, 1, 2, 3])
    assert cache.size() == sum(len(g) > 0 for g in df.generated_ids)
    assert sorted(tuple(r[1:]) for r in cache.pull(0, 0)[1]) == sorted(tuple(g) for g in df.generated_ids if len(g))
    assert SuffixCache(3, fs.resolve(str(out)), shard_ids=[0, 1, 2, 3]).size() == 3  # bounded

// Suffix decoding's index (engine/suffix.py's SuffixIndex) in C++: the same layout and look-up,
// the same proposals, for a fraction of the host's time a step. engine/suffix_native.py compiles
// it on first use and wraps it; engine/suffix.py's module docstring describes the algorithm and
// its pure-Python SuffixIndex is the reference this file follows line for line (the tests compare
// them on random streams).
//
// Positions are absolute, as in Python (toks[e - origin] is the token at position e; positions
// below `base` belong to dropped sequences, the storage before `origin` was freed). One hash map a
// key length (n in KEY_LENS: 1, 2, 3, 6), keyed by the n-gram's key as Python builds it (for ids
// below 2**21 each n-gram has its own key, as in Python; above, keys may be shared, in either).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <stdexcept>
#include <unordered_map>
#include <vector>

namespace py = pybind11;
using i64 = int64_t;
using u64 = uint64_t;
using u128 = unsigned __int128;

static const int KEY_LENS[4] = {1, 2, 3, 6};
static const i64 SEP = -1;
static const int SHIFT = 21;

struct KeyHash {
    size_t operator()(u128 k) const {
        u64 x = (u64)k ^ ((u64)(k >> 64) * 0x9E3779B97F4A7C15ULL);
        x ^= x >> 33;
        x *= 0xff51afd7ed558ccdULL;
        x ^= x >> 33;
        return (size_t)x;
    }
};
using Map = std::unordered_map<u128, i64, KeyHash>;

struct Row {
    i64 sep, first, end;
};

struct Draft {
    std::vector<i64> tokens;
    std::vector<double> probs;
    i64 match_len = 0;
    double score = 0.0;
};

// the keys of the n-grams ending at a token a with b, c, d, f, g before it (Python's _keys)
static inline u128 key2(i64 a, i64 b) { return (u128)(u64)a | (u128)(u64)b << SHIFT; }
static inline u128 key3(u128 k2, i64 c) { return k2 | (u128)(u64)(c + 1) << (2 * SHIFT); }
static inline u128 key6(u128 k3, i64 d, i64 f, i64 g) {
    return k3 | ((u128)(u64)d | (u128)(u64)f << SHIFT | (u128)(u64)(g + 1) << (2 * SHIFT)) << 64;
}

struct Index {
    int max_depth;
    i64 max_rows;  // -1: keep all
    i64 recent;    // occurrences of one key a look-up reads at most
    std::vector<i64> toks;
    std::vector<i64> prev[4];
    i64 origin = 0, base = 0;
    Map last[4];
    std::deque<Row> rows;
    i64 num_tokens = 0;
    std::vector<i64> cands, keep;  // scratch

    Index(int max_depth, i64 max_rows, i64 recent) : max_depth(max_depth), max_rows(max_rows), recent(recent) {
        if (max_depth < 1) throw std::invalid_argument("max_depth must be >= 1");
        if (this->recent < 1) this->recent = 1;
    }

    inline i64 stored_end() const { return origin + (i64)toks.size(); }

    void append(const i64 *p, i64 n) {
        toks.insert(toks.end(), p, p + n);
        for (auto &chain : prev) chain.resize(toks.size(), -1);
    }

    static inline void put(Map &m, std::vector<i64> &chain, i64 j, u128 k, i64 e) {
        auto r = m.try_emplace(k, e);
        if (r.second) {
            chain[j] = -1;
        } else {
            chain[j] = r.first->second;
            r.first->second = e;
        }
    }

    // index the n-grams ending at positions lo..hi-1 (each has its next token stored)
    void index(i64 lo, i64 hi) {
        const i64 *t = toks.data();
        for (i64 e = lo; e < hi; ++e) {
            i64 j = e - origin;
            i64 a = t[j];
            if (a < 0) continue;
            put(last[0], prev[0], j, (u128)(u64)a, e);
            i64 b = t[j - 1];
            if (b < 0) continue;
            u128 k2 = key2(a, b);
            put(last[1], prev[1], j, k2, e);
            i64 c = t[j - 2];
            if (c < 0) continue;
            u128 k3 = key3(k2, c);
            put(last[2], prev[2], j, k3, e);
            i64 d = t[j - 3], f, g;
            if (d < 0 || (f = t[j - 4]) < 0 || (g = t[j - 5]) < 0) continue;
            put(last[3], prev[3], j, key6(k3, d, f, g), e);
        }
    }

    void add(const i64 *p, i64 n, i64 start) {
        if (n <= start) return;
        i64 sep = stored_end();
        toks.push_back(SEP);
        append(p, n);
        i64 end = sep + 1 + n;
        i64 first = sep + std::max<i64>(start, 1);
        index(first, end - 1);
        rows.push_back({sep, first, end});
        num_tokens += n;
        if (max_rows >= 0)
            while ((i64)rows.size() > max_rows) evict();
    }

    // grow the last sequence to seq (which starts with what it holds)
    void extend(const i64 *seq, i64 n) {
        if (rows.empty()) throw py::index_error("no open sequence");
        Row &r = rows.back();
        i64 have = r.end - r.sep - 1;
        if (n <= have) return;
        append(seq + have, n - have);
        index(r.end - 1, r.sep + n);
        r.end = r.sep + 1 + n;
        num_tokens += n - have;
    }

    // the last `depth` tokens (at most) of the last sequence: [*lo, *hi) in toks
    void context(i64 depth, i64 &lo, i64 &hi) const {
        if (rows.empty()) throw py::index_error("no sequence");
        const Row &r = rows.back();
        lo = std::max(r.sep + 1, r.end - depth) - origin;
        hi = stored_end() - origin;
    }

    void evict() {
        Row r = rows.front();
        rows.pop_front();
        i64 new_base = rows.empty() ? r.end : rows.front().sep;
        const i64 *t = toks.data();
        auto drop = [&](int i, u128 k) {
            auto it = last[i].find(k);
            if (it != last[i].end() && it->second < new_base) last[i].erase(it);
        };
        for (i64 e = r.first; e < r.end - 1; ++e) {
            i64 j = e - origin;
            i64 a = t[j];
            if (a < 0) continue;
            drop(0, (u128)(u64)a);
            i64 b = t[j - 1];
            if (b < 0) continue;
            u128 k2 = key2(a, b);
            drop(1, k2);
            i64 c = t[j - 2];
            if (c < 0) continue;
            u128 k3 = key3(k2, c);
            drop(2, k3);
            i64 d = t[j - 3], f, g;
            if (d < 0 || (f = t[j - 4]) < 0 || (g = t[j - 5]) < 0) continue;
            drop(3, key6(k3, d, f, g));
        }
        num_tokens -= r.end - r.sep - 1;
        base = new_base;
        i64 cut = base - origin;  // free the storage below base once it is more than half of it
        if (2 * cut > (i64)toks.size()) {
            toks.erase(toks.begin(), toks.begin() + cut);
            for (auto &chain : prev) chain.erase(chain.begin(), chain.begin() + cut);
            origin = base;
        }
    }

    inline i64 lookup(int i, u128 k) const {
        auto it = last[i].find(k);
        return it == last[i].end() ? -1 : it->second;
    }

    // Python's _match: fills cands (the most recent first), returns the match length (0: none)
    i64 match(const i64 *ctx, i64 L) {
        cands.clear();
        if (L <= 0) return 0;
        if (L > max_depth) {
            ctx += L - max_depth;
            L = max_depth;
        }
        i64 a = ctx[L - 1];
        int i = -1;
        i64 p = -1;
        if (L >= 2) {
            u128 k2 = key2(a, ctx[L - 2]);
            if (L >= 3) {
                u128 k3 = key3(k2, ctx[L - 3]);
                if (L >= 6) {
                    p = lookup(3, key6(k3, ctx[L - 4], ctx[L - 5], ctx[L - 6]));
                    if (p >= base) i = 3;
                }
                if (i < 0) {
                    p = lookup(2, k3);
                    if (p >= base) i = 2;
                }
            }
            if (i < 0) {
                p = lookup(1, k2);
                if (p >= base) i = 1;
            }
        }
        if (i < 0) {
            p = lookup(0, (u128)(u64)a);
            if (p < base) return 0;
            i = 0;
        }
        const i64 *chain = prev[i].data();
        cands.push_back(p);
        for (i64 r = 1; r < recent; ++r) {
            p = chain[p - origin];
            if (p < base) break;
            cands.push_back(p);
        }
        i64 n = KEY_LENS[i];
        i64 depth = i == 3 ? L : std::min<i64>(L, KEY_LENS[i + 1] - 1);
        if (depth <= n) return n;
        const i64 *t = toks.data();
        // candidates that match all of it (the tokens before the key: ctx[L - depth, L - n))
        keep.clear();
        for (i64 q : cands) {
            i64 s = q - depth + 1;  // a start at or below base takes in base's SEP: no match
            if (s <= base) continue;
            const i64 *x = t + (s - origin);
            bool same = true;
            for (i64 u = 0; u < depth - n; ++u)
                if (x[u] != ctx[L - depth + u]) {
                    same = false;
                    break;
                }
            if (same) keep.push_back(q);
        }
        if (!keep.empty()) {
            cands.swap(keep);
            return depth;
        }
        for (i64 d = n; d < depth; ++d) {
            i64 want = ctx[L - 1 - d];
            keep.clear();
            for (i64 q : cands)
                if (t[q - d - origin] == want) keep.push_back(q);
            if (keep.empty()) return d;
            cands.swap(keep);
        }
        return depth;
    }

    inline i64 at(i64 e, i64 stop) const { return e < stop ? toks[e - origin] : SEP; }

    // Python's SuffixIndex.draft
    void draft(const i64 *ctx, i64 L, i64 limit, double factor, double min_prob, Draft &out) {
        out.tokens.clear();
        out.probs.clear();
        out.match_len = 0;
        out.score = 0.0;
        if (limit <= 0 || L <= 0) return;
        i64 n = match(ctx, L);
        if (!n) return;
        i64 cap = std::max<i64>(0, std::min<i64>(limit, (i64)(factor * (double)n + 1e-6)));
        const i64 stop = stored_end();
        if (cands.size() == 1) {  // one occurrence: its continuation, certain
            for (i64 e = cands[0] + 1; e < std::min(stop, cands[0] + 1 + cap); ++e) {
                i64 v = toks[e - origin];
                if (v == SEP) break;
                out.tokens.push_back(v);
            }
            if (out.tokens.empty()) return;
            out.probs.assign(out.tokens.size(), 1.0);
            out.match_len = n;
            out.score = (double)out.tokens.size();
            return;
        }
        out.match_len = n;
        // all continue alike (the slices, as stored: cut by the end of the tokens)
        {
            i64 s0 = cands[0] + 1, len0 = std::min(stop, s0 + cap) - s0;
            bool alike = true;
            for (size_t c = 1; c < cands.size() && alike; ++c) {
                i64 s = cands[c] + 1, len = std::min(stop, s + cap) - s;
                if (len != len0) {
                    alike = false;
                    break;
                }
                for (i64 u = 0; u < len; ++u)
                    if (toks[s + u - origin] != toks[s0 + u - origin]) {
                        alike = false;
                        break;
                    }
            }
            if (alike) {
                for (i64 u = 0; u < len0; ++u) {
                    i64 v = toks[s0 + u - origin];
                    if (v == SEP) break;
                    out.tokens.push_back(v);
                }
                out.probs.assign(out.tokens.size(), 1.0);
                out.score = (double)out.tokens.size();
                return;
            }
        }
        // token by token (beyond the stored tokens: SEP)
        std::vector<i64> &alive = keep;
        alive.clear();
        for (i64 q : cands) alive.push_back(q + 1);
        std::vector<i64> col(alive.size());
        double prob = 1.0;
        for (i64 j = 0; j < cap; ++j) {
            size_t m = alive.size();
            i64 total = 0;
            for (size_t c = 0; c < m; ++c) {
                col[c] = at(alive[c] + j, stop);
                total += col[c] != SEP;
            }
            if (!total) break;
            i64 best = SEP, top = 0;
            for (size_t c = 0; c < m; ++c) {  // distinct tokens in order of first appearance
                i64 v = col[c];
                if (v < 0) continue;
                bool seen = false;
                for (size_t u = 0; u < c; ++u)
                    if (col[u] == v) {
                        seen = true;
                        break;
                    }
                if (seen) continue;
                i64 k = 1;
                for (size_t u = c + 1; u < m; ++u) k += col[u] == v;
                if (k > top) {
                    best = v;
                    top = k;
                }
            }
            prob *= (double)top / (double)total;
            if (prob < min_prob) break;
            out.tokens.push_back(best);
            out.probs.push_back(prob);
            size_t w = 0;
            for (size_t c = 0; c < m; ++c)
                if (col[c] == best) alive[w++] = alive[c];
            alive.resize(w);
            bool one = true;  // one continuation left (up to cap, padded): the rest of it
            for (size_t c = 1; c < w && one; ++c)
                for (i64 u = j + 1; u < cap; ++u)
                    if (at(alive[c] + u, stop) != at(alive[0] + u, stop)) {
                        one = false;
                        break;
                    }
            if (one) {
                for (i64 u = j + 1; u < cap; ++u) {
                    i64 v = at(alive[0] + u, stop);
                    if (v == SEP) break;
                    out.tokens.push_back(v);
                    out.probs.push_back(prob);
                }
                break;
            }
        }
        double s = 0.0;
        for (double p : out.probs) s += p;
        out.score = s;
    }

    i64 num_keys() const { return (i64)(last[0].size() + last[1].size() + last[2].size() + last[3].size()); }
};

using Arr = py::array_t<i64, py::array::c_style | py::array::forcecast>;

static py::list to_list(const i64 *p, i64 n) {
    py::list out(n);
    for (i64 i = 0; i < n; ++i) out[i] = py::int_(p[i]);
    return out;
}

static std::vector<i64> from_list(const py::sequence &s) {
    std::vector<i64> v(py::len(s));
    for (size_t i = 0; i < v.size(); ++i) v[i] = s[i].cast<i64>();
    return v;
}

static py::tuple draft_tuple(const Draft &d) {
    py::list probs(d.probs.size());
    for (size_t i = 0; i < d.probs.size(); ++i) probs[i] = py::float_(d.probs[i]);
    return py::make_tuple(to_list(d.tokens.data(), (i64)d.tokens.size()), probs, d.match_len, d.score);
}

static Draft own_draft, job_draft;  // scratch of step (the GIL is held throughout)

// A proposer's step for one row (SuffixProposer.propose): grow the row's index to seq, draft from
// it and from the job's index (where there is one, with rows, and the row's proposal is not full
// and certain), keep the higher score (the row's on a tie). Returns (0, None) where nothing is
// proposed, else (1 row / 2 job, the tokens as an int64 array).
static py::tuple step(Index &row, Index *job, Arr seq, i64 limit, i64 depth, double factor, double min_prob) {
    row.extend(seq.data(), (i64)seq.size());
    i64 lo, hi;
    row.context(depth, lo, hi);
    std::vector<i64> ctx(row.toks.begin() + lo, row.toks.begin() + hi);  // job.draft must not see row grow
    row.draft(ctx.data(), hi - lo, limit, factor, min_prob, own_draft);
    const Draft *best = &own_draft;
    int source = 1;
    if (job != nullptr && !job->rows.empty() && own_draft.score < (double)limit) {
        job->draft(ctx.data(), hi - lo, limit, factor, min_prob, job_draft);
        if (!(own_draft.score >= job_draft.score)) {
            best = &job_draft;
            source = 2;
        }
    }
    if (best->tokens.empty()) return py::make_tuple(0, py::none());
    py::array_t<i64> out((py::ssize_t)best->tokens.size());
    std::copy(best->tokens.begin(), best->tokens.end(), out.mutable_data());
    return py::make_tuple(source, out);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "engine/suffix.py's SuffixIndex in C++ (engine/suffix_native.py)";
    py::class_<Index>(m, "Index")
        .def(py::init<int, i64, i64>(), py::arg("max_depth"), py::arg("max_rows"), py::arg("recent"))
        .def("add", [](Index &ix, Arr tokens, i64 start) { ix.add(tokens.data(), (i64)tokens.size(), start); })
        .def("extend", [](Index &ix, Arr seq) { ix.extend(seq.data(), (i64)seq.size()); })
        .def("context", [](Index &ix, i64 depth) {
            i64 lo, hi;
            ix.context(depth, lo, hi);
            return to_list(ix.toks.data() + lo, hi - lo);
        })
        .def("grow", [](Index &ix, Arr seq, i64 depth) {
            ix.extend(seq.data(), (i64)seq.size());
            i64 lo, hi;
            ix.context(depth, lo, hi);
            return to_list(ix.toks.data() + lo, hi - lo);
        })
        .def("match", [](Index &ix, const py::sequence &ctx) {
            std::vector<i64> c = from_list(ctx);
            i64 n = ix.match(c.data(), (i64)c.size());
            std::vector<i64> oldest_first(ix.cands.rbegin(), ix.cands.rend());
            return py::make_tuple(to_list(oldest_first.data(), (i64)oldest_first.size()), n);
        })
        .def("draft", [](Index &ix, const py::sequence &ctx, i64 limit, double factor, double min_prob) {
            std::vector<i64> c = from_list(ctx);
            Draft d;
            ix.draft(c.data(), (i64)c.size(), limit, factor, min_prob, d);
            return draft_tuple(d);
        })
        .def("tokens", [](Index &ix) { return to_list(ix.toks.data() + (ix.base - ix.origin), ix.stored_end() - ix.base); })
        .def_property_readonly("base", [](Index &ix) { return ix.base; })
        .def_property_readonly("num_tokens", [](Index &ix) { return ix.num_tokens; })
        .def_property_readonly("num_rows", [](Index &ix) { return (i64)ix.rows.size(); })
        .def("num_keys", &Index::num_keys);
    m.def("step", &step, py::arg("row"), py::arg("job").none(true), py::arg("seq"), py::arg("limit"),
          py::arg("depth"), py::arg("factor"), py::arg("min_prob"));
}

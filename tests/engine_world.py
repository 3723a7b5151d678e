"""What the engine tests share (not fixtures: those are in conftest.py): the tiny target and
draft, prompts and their HF greedy reference, an engine builder, and modelled device time with
planted proposals for the accept paths (tests that must not depend on the host's timing)."""

import copy

import numpy as np
import torch
from tiny import VOCAB, tiny_model

from spd_cluster.engine import SpDEngine, SpDSettings, StepCost
from spd_cluster.sessions.base import check_inputs, keep_index, verified_column
from spd_cluster.sessions.heads import TurboHeads
from spd_cluster.sessions.torch_session import TorchSession

EOS = 2
TARGET = tiny_model("llama", seed=0)
DRAFT = tiny_model("llama", seed=1, layers=1)  # a different, smaller model: low acceptance
MAX_NEW = 24


def make_prompts():
    g = np.random.default_rng(7)
    prompts = [g.integers(3, VOCAB, size=n).tolist() for n in (5, 17, 9, 3, 12, 26, 7)]
    prompts.append(prompts[1][:6] * 4)  # repeats itself: prompt lookup has something to find
    return prompts


PROMPTS = make_prompts()


def hf_greedy(model, prompt, max_new=MAX_NEW, eos=EOS):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


REFERENCE = [hf_greedy(TARGET, p) for p in PROMPTS]


def random_heads(num_heads=4, layers=1, seed=3):
    torch.manual_seed(seed)
    heads = TurboHeads(TARGET.config.hidden_size, num_heads, layers)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return heads


def engine(mode, k, fbs, ctx_len=128, target=TARGET, draft=DRAFT, step_cost=None, **kw):
    settings = SpDSettings(num_speculative_tokens=k, prefill_seq_len=8, ctx_len=ctx_len,
                           max_new_tokens=kw.pop("max_new_tokens", MAX_NEW), full_batch_size=fbs, **kw)
    heads = random_heads() if mode == "multiproj" else None
    t = TorchSession(target, fbs, ctx_len, heads=heads)
    d = TorchSession(draft, fbs, ctx_len, draft_vocab=settings.draft_vocab) if mode == "draft" else None
    return SpDEngine(mode, t, None, settings, draft=d, eos_token_ids=[EOS], step_cost=step_cost)


# a device's step-cost curve (a verify 5% dearer a token), for tests whose adaptive k must not
# follow the host's timing: on a loaded host a measured curve can price every width out
DEVICE_CURVE = StepCost([1.0 + 0.05 * w for w in range(8)])


# -- modelled time and planted proposals: accept paths that do not depend on the host ------------


class ModelledTime:
    """A clock that only device calls move: ``priced(session, seconds)`` advances it by a call's
    modelled cost (``seconds(inputs)`` or a constant), and the engine and adaptive k read it as
    their ``perf_counter``. Adaptive k's choices, the run's times and so its speedups are then the
    same on any host, however loaded."""

    def __init__(self, monkeypatch):
        self.t = 0.0
        for module in ("spd_cluster.engine.engine", "spd_cluster.engine.adaptive"):
            monkeypatch.setattr(f"{module}.perf_counter", self)

    def __call__(self) -> float:
        return self.t

    def priced(self, session, seconds):
        return Priced(session, self, seconds if callable(seconds) else (lambda inputs: seconds))


class Priced:
    def __init__(self, inner, clock: ModelledTime, seconds):
        self.inner, self.clock, self.seconds = inner, clock, seconds
        self.full_batch_size, self.ctx_len = inner.full_batch_size, inner.ctx_len
        self.vocab_size, self.num_heads = inner.vocab_size, inner.num_heads
        self.eos_token_ids = list(inner.eos_token_ids)

    def run(self, inputs):
        out = self.inner.run(inputs)
        self.clock.t += self.seconds(inputs)
        return out


def verify_cost(base=1.0, per_token=0.05):
    """A target call of w tokens a row costs base * (1 + per_token * (w - 1)): a device's curve."""
    return lambda inputs: base * (1 + per_token * (np.shape(inputs["input_ids"])[1] - 1))


class PlantedHeads:
    """A target session whose projection heads guess the target's own greedy continuation (from
    ``fulls``: each prompt followed by its reference), wrong at the positions where ``miss(p)``:
    multiproj's accept path with heads that copy the target's next-token predictions, no training.
    Greedy (``argmax``) calls only; ``inner`` runs as a plain session."""

    def __init__(self, inner, fulls, num_heads=4, miss=lambda position: False):
        self.inner, self.fulls, self.miss = inner, [list(f) for f in fulls], miss
        self.full_batch_size, self.ctx_len = inner.full_batch_size, inner.ctx_len
        self.vocab_size, self.num_heads = inner.vocab_size, num_heads
        self.eos_token_ids = list(inner.eos_token_ids)
        self.kv = np.zeros((inner.full_batch_size, inner.ctx_len), dtype=np.int64)  # the token at each position

    def run(self, inputs):
        heads = bool(np.asarray(inputs.get("head_guesses", True)).reshape(-1)[0])
        out = self.inner.run({**inputs, "head_guesses": np.array(False)})
        x = check_inputs(inputs, self.full_batch_size, self.ctx_len)
        rows, cols = np.nonzero(x.position_ids >= 0)
        self.kv[x.batch_index[rows], x.position_ids[rows, cols]] = x.input_ids[rows, cols]
        if not heads:
            return out
        assert "tokens" in out, "planted heads answer greedy (argmax) calls only"
        kept = keep_index(x.position_ids, x.num_logits)
        col = verified_column(x, kept, out["tokens"])
        guesses = np.zeros((len(col), self.num_heads), dtype=np.int64)
        for b, c in enumerate(col):
            end = int(x.position_ids[b, kept[b, c]]) + 1
            seq = self.kv[x.batch_index[b], :end].tolist() + [int(out["tokens"][b, c])]
            full = next((f for f in self.fulls if f[: len(seq)] == seq), [])
            for h in range(self.num_heads):
                p = len(seq) + h
                right = full[p] if p < len(full) else 0
                guesses[b, h] = (right + 1) % self.vocab_size if self.miss(p) else right
        return {**out, "head_tokens": guesses, "head_probs": np.ones(guesses.shape, np.float32)}


def perturbed(model, noise, seed=5):
    """A copy of ``model`` with Gaussian noise on every weight: a draft that agrees with it on some
    positions only."""
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * noise)
    return other


NEAR = perturbed(TARGET, 0.005)  # agrees with the target often, not always: partial accepts
FULLS = [p + r for p, r in zip(PROMPTS, REFERENCE)]

# case -> (mode, draft model, heads: "copy" or planted heads' miss rule, what the accepts must show)
ACCEPT_CASES = {
    "baseline": ("baseline", None, None, "none"),
    "pld": ("pld", None, None, "some"),
    "draft-same": ("draft", TARGET, None, "all"),
    "draft-near": ("draft", NEAR, None, "partial"),
    # zero ResBlocks: each head is the base readout, so it guesses the target's own next token again:
    # right where the target's text repeats a token (runs of accepts), wrong elsewhere
    "multiproj-copy-heads": ("multiproj", None, "copy", "some"),
    "multiproj-planted": ("multiproj", None, lambda p: False, "all"),
    "multiproj-partial": ("multiproj", None, lambda p: p % 3 == 0, "partial"),
}


def accept_run(case, adaptive, fbs, clock, k=3, prompts=PROMPTS):
    mode, draft_model, heads, _ = ACCEPT_CASES[case]
    s = SpDSettings(num_speculative_tokens=k, prefill_seq_len=8, ctx_len=128, max_new_tokens=MAX_NEW,
                    full_batch_size=fbs, adaptive_k=adaptive)
    copy_heads = TurboHeads(TARGET.config.hidden_size, 4) if heads == "copy" else None
    target = TorchSession(TARGET, fbs, 128, heads=copy_heads)
    if callable(heads):
        target = PlantedHeads(target, FULLS, num_heads=4, miss=heads)
    # a device's costs: a verify 5% dearer a token, a draft forward a tenth of a plain step
    target = clock.priced(target, verify_cost())
    draft = clock.priced(TorchSession(draft_model, fbs, 128), 0.1) if draft_model is not None else None
    return SpDEngine(mode, target, None, s, draft=draft, eos_token_ids=[EOS]).generate(prompts)


def verifies(monkeypatch) -> list[tuple[int, int]]:
    """(proposed, accepted) of every row of every greedy verify the engine runs from now on."""
    import spd_cluster.engine.engine as engine_module

    seen, verify = [], engine_module.verify_greedy

    def spy(out, proposals, counts):
        found = verify(out, proposals, counts)
        seen.extend(zip(np.asarray(counts).tolist(), found.accepted.tolist()))
        return found

    monkeypatch.setattr(engine_module, "verify_greedy", spy)
    return seen

"""Every mode on a torch device (CUDA) against the target's own HF ``generate`` on that device,
the heads trainer there, and session speed against HF ``generate`` on a real-sized model shape.

    python bench/check_device.py --device cuda          # on a GPU machine; a few minutes
    python bench/check_device.py --device cpu --quick   # the same checks on CPU

No weights are needed: models are random, built from configs (tiny ones for the token-for-token
checks, their logits sharpened so greedy argmax has no near-ties; a Qwen2.5-0.5B-shaped one for
speed). float32 runs with TF32 off and must match HF exactly; bfloat16 is reported (a k + 1-row
verify and a 1-row decode may round a near-tie differently on GPU kernels). Exits 1 on a float32
mismatch or a trainer that does not learn.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from time import perf_counter

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spd_cluster.engine import SpDEngine, SpDSettings  # noqa: E402
from spd_cluster.sessions.heads import TurboHeads  # noqa: E402
from spd_cluster.sessions.torch_session import TorchSession  # noqa: E402
from spd_cluster.training import TrainSettings, train_heads  # noqa: E402

EOS = 2


def random_model(device, dtype, seed=0, vocab=512, hidden=128, layers=3, heads=4, kv_heads=2, inter=None,
                 sharpen=8.0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=EOS, pad_token_id=0,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model.to(device=device, dtype=dtype).eval()


def hf_greedy(model, prompt, max_new, eos=EOS):
    x = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(vocab, n=10, seed=7):
    g = np.random.default_rng(seed)
    ps = [g.integers(3, vocab, size=int(m)).tolist() for m in g.integers(3, 40, size=n)]
    ps.append(ps[0][:5] * 6)  # repeats itself: prompt lookup has something to find
    return ps


def random_heads(hidden, num_heads=4, seed=3):
    torch.manual_seed(seed)
    heads = TurboHeads(hidden, num_heads, 1)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return heads


def engine(mode, target, draft, heads, k, fbs, max_new, ctx=160, threshold=0.0):
    s = SpDSettings(num_speculative_tokens=k, prefill_seq_len=16, ctx_len=ctx, max_new_tokens=max_new,
                    full_batch_size=fbs, confidence_threshold=threshold)
    t = TorchSession(target, fbs, ctx, heads=heads if mode == "multiproj" else None)
    d = TorchSession(draft, fbs, ctx) if mode == "draft" else None
    return SpDEngine(mode, t, None, s, draft=d, eos_token_ids=[EOS])


def lossless(device, dtype, quick, max_new=32):
    target = random_model(device, dtype, seed=0)
    draft = random_model(device, dtype, seed=1, layers=1)
    heads = random_heads(target.config.hidden_size)
    ps = prompts(target.config.vocab_size)
    ref = [hf_greedy(target, p, max_new) for p in ps]
    base = None  # our own baseline: the target alone on the same session code
    rows = []
    # "self-draft": the target drafts for itself, so every proposal is accepted and the emitted
    # tokens come from verify rows (a random draft model is rejected almost always)
    for mode in ("baseline", "draft", "self-draft", "pld", "multiproj"):
        for k in ((3,) if quick else (1, 4)):
            for fbs in (1, 4):
                for t in ((0.0, 0.1) if mode in ("draft", "multiproj") else (0.0,)):
                    proposer = target if mode == "self-draft" else draft
                    info = engine(mode.removeprefix("self-"), target, proposer, heads, k, fbs, max_new,
                                  threshold=t).generate(ps)
                    got = [g.tolist() for g in info.generated_ids]
                    base = got if base is None else base
                    same = sum(a == b for a, b in zip(got, ref))
                    rows.append(dict(dtype=str(dtype).split(".")[-1], mode=mode, k=k, fbs=fbs, threshold=t,
                                     identical=f"{same}/{len(ps)}", ok=same == len(ps),
                                     same_as_baseline=f"{sum(a == b for a, b in zip(got, base))}/{len(ps)}",
                                     accepted=round(info.perf_metrics.mean_num_accepted_tokens, 2)))
    return rows


def trainer(device):
    target = random_model(device, torch.float32, seed=4, vocab=256, hidden=64, layers=2)
    g = np.random.default_rng(11)
    ps = [g.integers(3, 256, size=int(n)).tolist() for n in g.integers(3, 12, size=32)]
    s = TrainSettings(num_heads=3, steps=150, batch_size=64, lr=3e-3, warmup_steps=5, max_new_tokens=24,
                      ctx_len=64, prefill_seq_len=8, gen_batch_size=8, eval_every=50, eval_fraction=0.2)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = perf_counter()
        heads, report = train_heads(target, None, ps, Path(tmp) / "h", s, model_name="random", eos_token_ids=[EOS],
                                    progress=False)
        took = perf_counter() - t0
        reloaded = TurboHeads.load(Path(tmp) / "h", hidden_size=64)
    first, last = float(np.mean(report["losses"][:5])), float(np.mean(report["losses"][-10:]))
    ref = [hf_greedy(target, p, 24) for p in ps]
    info = engine("multiproj", target, None, reloaded, 3, 4, 24, ctx=64).generate(ps)
    same = sum(a == b.tolist() for a, b in zip(ref, info.generated_ids))
    return dict(first_loss=round(first, 3), last_loss=round(last, 3), top1=report["top1_accuracy"],
                seconds=round(took, 1), multiproj_identical=f"{same}/{len(ps)}",
                accepted=round(info.perf_metrics.mean_num_accepted_tokens, 2),
                ok=last < 0.75 * first and same == len(ps))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def speed(device, dtype, quick, new=64):
    """Qwen2.5-0.5B's shape (random weights): HF generate one prompt at a time vs our session
    (baseline mode) at 1 and 8 slots, same prompts, EOS ignored, decode tokens per second."""
    layers = 4 if quick else 24
    model = random_model(device, dtype, seed=0, vocab=151936, hidden=896, layers=layers, heads=14, kv_heads=2,
                         inter=4864, sharpen=1.0)
    g = np.random.default_rng(0)
    ps = [g.integers(3, 150000, size=int(n)).tolist() for n in g.integers(16, 64, size=8)]
    x = torch.tensor([ps[0]], device=device)
    with torch.no_grad():
        model.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)  # warm-up
        sync(device)
        t0 = perf_counter()
        for p in ps:
            model.generate(torch.tensor([p], device=device), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        sync(device)
        hf = len(ps) * new / (perf_counter() - t0)
    out = {"model": f"qwen2.5-0.5b shape, {layers} layers, random", "dtype": str(dtype).split(".")[-1],
           "hf_generate_tok_s": round(hf, 1)}
    for fbs in (1, 8):
        s = SpDSettings(num_speculative_tokens=1, prefill_seq_len=64, ctx_len=256, max_new_tokens=new,
                        full_batch_size=fbs, ignore_eos=True)
        eng = SpDEngine("baseline", TorchSession(model, fbs, 256), None, s, eos_token_ids=[EOS])
        eng.generate(ps[:1])
        sync(device)
        t0 = perf_counter()
        eng.generate(ps)
        sync(device)
        out[f"session_fbs{fbs}_tok_s"] = round(len(ps) * new / (perf_counter() - t0), 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer settings and a 4-layer speed model")
    ap.add_argument("--parts", default="lossless,trainer,speed", help="which checks, comma-separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {args.device} ({name}), torch {torch.__version__}", flush=True)
    report = {"device": name, "torch": torch.__version__, "lossless": [], "speed": []}
    failed = False
    parts = args.parts.split(",")
    for dtype in (torch.float32, torch.bfloat16) if "lossless" in parts else ():
        t0 = perf_counter()
        rows = lossless(args.device, dtype, args.quick)
        report["lossless"] += rows
        bad = [r for r in rows if not r["ok"]]
        print(f"{dtype}: {len(rows) - len(bad)}/{len(rows)} settings token-identical to HF generate "
              f"({perf_counter() - t0:.0f}s); prompts identical to our own baseline: "
              f"{' '.join(r['same_as_baseline'] for r in rows)}", flush=True)
        for r in bad:
            print("   differs:", r, flush=True)
        failed |= dtype == torch.float32 and bool(bad)
    tr = trainer(args.device) if "trainer" in parts else {"ok": True}
    report["trainer"] = tr
    if "trainer" in parts:
        print(f"trainer: loss {tr['first_loss']} -> {tr['last_loss']}, top-1 {tr['top1']}, {tr['seconds']}s; "
              f"multiproj with the trained heads identical {tr['multiproj_identical']}, {tr['accepted']} "
              f"accepted/step", flush=True)
    failed |= not tr["ok"]
    for dtype in (torch.float32, torch.bfloat16) if "speed" in parts else ():
        sp = speed(args.device, dtype, args.quick)
        report["speed"].append(sp)
        print("speed:", sp, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print("FAILED" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""An engine that costs nothing, for measuring the orchestration alone (bench_orchestration.py).

A target actor builds it instead of its model when SPD_CLUSTER_ENGINE=stub_engine:build is set in
its environment (cluster/actors.py, ENGINE_HOOK). Every prompt gets max_new_tokens made-up tokens
and a text of matching length at once; the metrics are consistent with those rows (two tokens a
step), so the job's files, progress and summary are what a real job writes.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from spd_cluster.engine.metrics import CloudAI100ExecInfo, PromptResult, SpDPerfMetrics


class StubEngine:
    def __init__(self, cfg):
        self.settings = cfg.spd
        self.mode = cfg.mode
        self.proposer = None
        self.session = SimpleNamespace(vocab_size=49152)

    def generate(self, prompts, prompt_ids=None, on_result=None) -> CloudAI100ExecInfo:
        t0 = time.perf_counter()
        n = self.settings.max_new_tokens
        ids = list(range(1, n + 1))
        text = "tok " * n
        steps = [2] * (n // 2) + ([1] if n % 2 else [])
        results = []
        for i, p in enumerate(prompts):
            r = PromptResult(i, p, None if prompt_ids is None else prompt_ids[i], generated_ids=ids,
                             generated_text=text, num_prompt_tokens=len(p) // 4 + 1, finish_reason="length",
                             ttft_s=1e-4, e2e_s=1e-3, num_decode_iterations=len(steps), accepted_per_step=steps)
            results.append(r)
            if on_result is not None:
                on_result(r)
        e2e = time.perf_counter() - t0
        total = n * len(results)
        m = SpDPerfMetrics(mean_ttft=1e-4, batch_ttft=1e-4, decode_throughput=0.0, e2e_throughput=total / max(e2e, 1e-9),
                           mean_num_accepted_tokens=sum(steps) / len(steps), max_gen_len=n,
                           generated_tokens_per_prompt=[n] * len(results), e2e_time=e2e, decode_time=e2e,
                           decode_draft_time=0.0, decode_target_time=0.0, decode_iterations=len(steps),
                           num_generated_tokens=total, num_decode_tokens=total - len(results),
                           num_row_steps=len(steps) * len(results), num_accepted_tokens=sum(steps) * len(results),
                           target_forwards=len(steps) + len(results))
        s = self.settings
        return CloudAI100ExecInfo(prompts=list(prompts), batch_size=s.full_batch_size, generated_texts=[], generated_ids=[],
                                  perf_metrics=m, num_speculative_tokens=s.num_speculative_tokens,
                                  prefill_seq_len=s.prefill_seq_len, ctx_len=s.ctx_len, prefill_bsz=1,
                                  draft_model_name="", target_model_name="stub", full_batch_size=s.full_batch_size,
                                  mode=self.mode, results=results)


def build(cfg) -> StubEngine:
    return StubEngine(cfg)

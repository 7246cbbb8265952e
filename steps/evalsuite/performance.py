"""performance: SSE streaming, and throughput consistency over repeated runs (timed by the runner, run solo)."""
from __future__ import annotations

import statistics

from steps.evalsuite.core import Grade, Reply, Test, fail, ok, register

MAX_CV = 0.25  # largest coefficient of variation of tokens/s across the runs


def _streamed(reply: Reply) -> Grade:
    if reply.chunks < 2:
        return fail(f"{reply.chunks} SSE chunk(s) with content: not streamed")
    if not reply.text:
        return fail("streamed an empty reply")
    if reply.finish_reason not in ("stop", "length"):
        return fail(f"stream ended with finish_reason {reply.finish_reason!r}")
    return ok(f"{reply.chunks} chunks, {len(reply.text)} characters, finish_reason {reply.finish_reason}")


register(Test("sse_streaming", "performance",
              [{"role": "user", "content": "Count from 1 to 20, separated by spaces."}], _streamed,
              max_tokens=96, stream=True, solo=True))


def _steady(reply: Reply) -> Grade:
    timings = reply.timings
    if len(timings) < 3:
        return fail(f"{len(timings)} timed run(s), expected 3")
    short = [t.completion_tokens for t in timings if t.completion_tokens < 16]
    if short:
        return fail(f"a run produced only {short[0]} tokens: too few to time")
    rates = [t.tokens_per_s for t in timings]
    if min(rates) <= 0:
        return fail(f"tokens/s {rates}")
    mean = statistics.fmean(rates)
    cv = statistics.pstdev(rates) / mean
    summary = f"tokens/s {', '.join(f'{r:.1f}' for r in rates)} (mean {mean:.1f}, CV {cv:.1%})"
    return ok(summary) if cv <= MAX_CV else fail(f"{summary}: varies more than {MAX_CV:.0%}")


register(Test("throughput_consistency", "performance",
              [{"role": "user", "content": "Write about 150 words on how rivers shape the land."}], _steady,
              max_tokens=128, repeats=3, solo=True, times_only=True))

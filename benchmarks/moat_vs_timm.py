"""MOAT / tiny-MOAT vs timm peers on CPU (fp32 and bf16), with the goals we track.

    python benchmarks/moat_vs_timm.py            # full run (~15-20 min on 2 cores)
    python benchmarks/moat_vs_timm.py --quick    # a few iterations, smoke test

Writes OUT/moat_vs_timm.json (rows + run metadata) and OUT/moat_vs_timm.md (README tables).
All models run in one process, interleaved, with one memory format for every model: `auto`
times channels_last against contiguous first and keeps the faster (geometric mean over all).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402

from mobilezoo.bench.markdown import Column, table  # noqa: E402
from mobilezoo.bench.suites.classify import benchmark, format_markdown  # noqa: E402

MODELS = ["tiny_moat_0", "tiny_moat_1", "tiny_moat_2", "tiny_moat_3", "moat_0"]
EAGER = [f"eager:{m}" for m in MODELS]  # the same models unfused, as trained (fusion gain)
PEERS = ["timm:mobilevit_xs@256", "timm:mobilevit_s@256", "timm:efficientnet_b0", "timm:coatnet_0_224"]
GMACS_REF = "coatnet_0_224"  # goal 1: every MOAT variant >= its GMAC/s, same run and precision
BF16_GOAL = 1.8              # goal 2: bf16 throughput >= 1.8x fp32 at batch 32
FULL = dict(warmup=10, iters=100, batch_iters=10, rounds=10)
QUICK = dict(warmup=2, iters=6, batch_iters=2, rounds=2)
PROBE = dict(warmup=2, iters=4, batch=8, batch_iters=2, rounds=2)  # memory-format probe


class IdleWaiter:
    """A `pause` hook: before each timed chunk wait (up to max_wait s, budget s in all) until other
    processes use less than `max_busy` cores, so a shared machine's load spoils fewer samples."""

    def __init__(self, max_busy: float = 0.5, max_wait: float = 10.0, budget: float = 300.0):
        self.max_busy, self.max_wait, self.budget = max_busy, max_wait, budget
        self.checks = self.waited = self.gave_up = 0
        self.spent = 0.0

    @staticmethod
    def _busy_cores(dt: float = 0.25) -> float:
        def snap():
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return sum(v) - v[3] - v[4], sum(v)  # busy (all but idle, iowait), total jiffies
        b0, t0 = snap()
        time.sleep(dt)
        b1, t1 = snap()
        return (os.cpu_count() or 1) * (b1 - b0) / max(t1 - t0, 1)

    def __call__(self) -> None:
        self.checks += 1
        start = time.time()
        try:
            while self._busy_cores() > self.max_busy:
                if time.time() - start > min(self.max_wait, self.budget - self.spent):
                    self.gave_up += 1
                    break
                time.sleep(1.0)
        except OSError:
            return
        waited = time.time() - start
        self.spent += waited
        self.waited += waited > 1.0

    def summary(self) -> dict:
        """How often the CPU was busy with other work before a chunk."""
        return {"chunks": self.checks, "waited_for_idle": self.waited,
                "ran_busy_anyway": self.gave_up, "seconds_waited": round(self.spent),
                "max_busy_cores": self.max_busy, "max_wait_s": self.max_wait, "budget_s": self.budget}


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's guess)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def pick_memory_format(args, log) -> tuple[bool, dict]:
    """Time every model in both formats; channels_last for all iff its geometric-mean speed-up >= 1."""
    thr = {}
    for cl in (True, False):
        rows = benchmark(MODELS, PEERS, args.img_size, args.threads, args.precisions,
                         channels_last=cl, log=log, **PROBE)
        thr[cl] = {f"{r['spec']}/{r['precision']}": r["throughput"] for r in rows}
    ratios = {k: round(thr[True][k] / thr[False][k], 3) for k in thr[True]}
    geo = math.exp(sum(math.log(v) for v in ratios.values()) / len(ratios))
    return geo >= 1.0, {"channels_last_over_contiguous": ratios, "geomean": round(geo, 3)}


def check_goals(rows: list[dict]) -> dict:
    """Goal verdicts from the rows of one run (nothing is assumed: missing data fails)."""
    ours = [r for r in rows if r["source"] == "mobilezoo"]
    gmacs = [{"model": r["name"], "precision": r["precision"], "gmacs_per_s": r["gmacs_per_s"],
              "ratio": r.get(f"vs_{GMACS_REF}", {}).get("gmacs_per_s"),
              "met": r.get(f"vs_{GMACS_REF}", {}).get("gmacs_per_s", 0) >= 1.0} for r in ours]
    bf16 = [{"model": r["name"], "speedup": r.get("bf16_speedup"),
             "met": (r.get("bf16_speedup") or 0) >= BF16_GOAL} for r in ours if r["precision"] == "bf16"]
    return {"gmacs_vs_" + GMACS_REF: gmacs, "bf16_speedup_ge_%.1f" % BF16_GOAL: bf16,
            "all_met": all(g["met"] for g in gmacs + bf16)}


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _ratio_table(rows: list[dict], peers: list[str]) -> str:
    def ratio(p: str, key: str):
        return lambda r: _x(r.get(f"vs_{p}") and r[f"vs_{p}"][key])
    columns = [Column("Model", lambda r: r["name"], "left"), Column("Prec", lambda r: r["precision"], "right")]
    for p in peers:
        columns += [Column(f"GMAC/s vs {p}", ratio(p, "gmacs_per_s"), "right"),
                    Column(f"latency vs {p}", ratio(p, "latency"), "right")]
    return table(columns, [r for r in rows if r["source"] == "mobilezoo"])


def _verdict(g: dict) -> str:
    return "met" if g["met"] else "NOT met"


GMACS_COLUMNS = (
    Column("Model", lambda g: g["model"], "left"), Column("Prec", lambda g: g["precision"], "right"),
    Column("GMAC/s", lambda g: f"{g['gmacs_per_s']:.1f}", "right"),
    Column("vs " + GMACS_REF, lambda g: _x(g["ratio"]), "right"), Column("", _verdict, "left"),
)
BF16_COLUMNS = (
    Column("Model", lambda g: g["model"], "left"),
    Column("bf16 / fp32 throughput", lambda g: _x(g["speedup"]), "right"), Column("", _verdict, "left"),
)


def render(rows: list[dict], goals: dict, meta: dict) -> str:
    """The Markdown report: setup, results, ratios vs each peer, goal verdicts."""
    ok = lambda met: "**met**" if met else "**NOT met**"  # noqa: E731
    peers = [p.split(":", 1)[1].split("@")[0] for p in PEERS]
    g1, g2 = goals["gmacs_vs_" + GMACS_REF], goals["bf16_speedup_ge_%.1f" % BF16_GOAL]
    out = [
        "# MOAT vs timm peers on CPU",
        "",
        f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, timm {meta['timm']}; "
        f"eval + `torch.inference_mode()`, bf16 = "
        + ("every model's weights and inputs cast to bfloat16 (ours after BN folding in fp32); "
           if meta.get("bf16") == "cast" else "`torch.autocast('cpu', bfloat16)` per forward; ")
        + f"memory format for every model: **{'channels_last' if meta['channels_last'] else 'contiguous'}** "
        f"({meta['memory_format_choice']}). Latency: batch 1, median and p90 of {meta['iters']} runs; "
        f"throughput: batch {meta['batch']}, median of {meta['batch_iters']} runs; all models "
        f"interleaved over {meta['rounds']} rounds in one process after {meta['warmup']} warm-up runs. "
        f"Our models run as deployed, through `mobilezoo.layers.fuse.fuse_for_inference` (BatchNorm "
        f"folded into the convolutions, activations fused into them as oneDNN post-ops; same outputs "
        f"to 1e-6); `(eager)` rows are the same models unfused, as trained; timm peers run as timm "
        f"builds them. "
        f"MACs: FlopCounterMode / 2 at batch 1. Peak MB: rise of the process RSS high-water mark "
        f"during one batch-{meta['batch']} forward (activations, not weights). "
        f"Load average before/after: {meta['loadavg_before']} / {meta['loadavg_after']}"
        + (f"; idle waits: {meta['idle_wait']}" if meta.get("idle_wait") else "")
        + (" (**quick run: few iterations, numbers are rough**)" if meta["quick"] else "") + ".",
        "",
        format_markdown(rows),
        "",
        "## Ours relative to each peer (same run, same precision)",
        "",
        "GMAC/s ratio > 1: we keep the CPU busier; latency ratio < 1: we are faster per image.",
        "",
        _ratio_table(rows, peers),
        "",
        "## Goals",
        "",
        f"1. Every MOAT variant achieves at least the GMAC/s of {GMACS_REF}: "
        f"{ok(all(g['met'] for g in g1))}",
        "",
        table(GMACS_COLUMNS, g1),
        "",
        f"2. bf16 at least {BF16_GOAL}x faster than fp32 at batch {meta['batch']}: "
        f"{ok(all(g['met'] for g in g2))}",
        "",
        table(BF16_COLUMNS, g2),
        "",
    ]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="output folder for moat_vs_timm.json / .md")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--memory-format", choices=["auto", "channels_last", "contiguous"], default=None,
                   help="default: auto (timed) for a full run, channels_last with --quick")
    p.add_argument("--no-eager", dest="eager", action="store_false",
                   help="leave out the unfused `eager:` rows (about halves the run)")
    p.add_argument("--no-wait-idle", dest="wait_idle", action="store_false",
                   help="do not wait for other processes to go quiet before each timed chunk")
    args = p.parse_args(argv)
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    fmt = args.memory_format or ("channels_last" if args.quick else "auto")
    load_before = [round(x, 2) for x in os.getloadavg()]
    if fmt == "auto":
        channels_last, probe = pick_memory_format(args, log)
        choice = f"auto: channels_last / contiguous throughput geomean {probe['geomean']:.3f}x"
    else:
        channels_last, probe, choice = fmt == "channels_last", None, "fixed by --memory-format"
    settings = QUICK if args.quick else FULL
    waiter = IdleWaiter() if args.wait_idle else None
    t0 = time.time()
    models = MODELS + (EAGER if args.eager else [])
    rows = benchmark(models, PEERS, args.img_size, args.threads, args.precisions, args.batch,
                     channels_last=channels_last, log=log, pause=waiter, **settings)
    meta = dict(cpu=cpu_name(), threads=args.threads, torch=torch.__version__, timm=timm.__version__,
                python=platform.python_version(), batch=args.batch, img_size=args.img_size,
                channels_last=channels_last, memory_format_choice=choice, memory_format_probe=probe,
                quick=args.quick, seconds=round(time.time() - t0, 1), loadavg_before=load_before, bf16="cast",
                loadavg_after=[round(x, 2) for x in os.getloadavg()],
                idle_wait=waiter.summary() if waiter else None, **settings)
    goals = check_goals(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moat_vs_timm.json").write_text(json.dumps(
        {"meta": meta, "goals": goals, "rows": rows}, indent=1) + "\n")
    (args.out / "moat_vs_timm.md").write_text(render(rows, goals, meta))
    print(render(rows, goals, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

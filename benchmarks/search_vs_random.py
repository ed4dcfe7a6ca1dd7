"""Does the latency-aware search beat random architectures of the same latency? (the MobileDets paper's search targets)

    python benchmarks/search_vs_random.py --latency-model benchmarks/results/latency_model_torch.json \\
        --target-ms 30 --steps 2000 --jobs 3                  # everything (hours on a 2-core CPU)
    python benchmarks/search_vs_random.py ... --no-latency    # search + training only (e.g. on a GPU box)
    python benchmarks/search_vs_random.py ... --latency-only  # then latency on the deployment machine

1. Search (`mobilezoo search`) for `--target-ms` with the cost model of the deployment machine.
2. Draw architectures uniformly from the same space until `--random` of them have a predicted
   latency within `--tolerance` of the target (matched latency).
3. Train the searched and the random architectures standalone with the same recipe
   (`mobilezoo train detect_shapes --arch ...`, same seed) and read their val mAP.
4. Measure every architecture's latency on this machine, the way the cost model was measured
   (batch 1, 320x320, the model's runtime and threads).

Targets: the searched architecture's measured latency within 10% of the target, and a higher val
mAP than at least 6 of the 8 random architectures. Every step skips work already done in WORK
(a killed run continues). Writes OUT/search_vs_random.json and .png (the README section).
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mobilezoo.nas import LatencyModel, measure_latency, sample, save_arch, to_arch  # noqa: E402
from mobilezoo.nas.space import from_arch  # noqa: E402

GOAL_WITHIN, GOAL_BEATEN = 0.10, 6
SEARCH_ONLY = ("steps", "search_args")


def matched_random(lat_model: LatencyModel, target_ms: float, tolerance: float, n: int, seed: int,
                   max_draws: int = 100_000) -> list[list[int]]:
    """`n` uniform draws from the model's space whose predicted latency is within `tolerance` of the target."""
    rng, picked = random.Random(seed), []
    for _ in range(max_draws):
        c = sample(lat_model.space, rng)
        if abs(lat_model.predict(c) / target_ms - 1) <= tolerance:
            picked.append(c)
            if len(picked) == n:
                return picked
    raise SystemExit(f"only {len(picked)} of {max_draws} random architectures are within {tolerance:.0%} of "
                     f"{target_ms} ms: choose a target nearer the middle of the space")


def _mobilezoo(*args: str) -> list[str]:
    return [sys.executable, "-m", "mobilezoo", *args]


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}; see {log}")


def final_metrics(run_dir: Path) -> dict | None:
    """The last evaluated epoch of a finished training run, or None."""
    log = run_dir / "metrics.jsonl"
    if not (run_dir / "model.safetensors").is_file() or not log.is_file():
        return None
    evals = [r for r in map(json.loads, log.read_text().splitlines()) if "val_map" in r]
    return evals[-1] if evals else None


def search(args, work: Path) -> Path:
    arch = work / "search" / "arch.json"
    if not arch.is_file():
        resume = ["--resume"] if (work / "search").is_dir() else []
        _run(_mobilezoo("search", "--data", args.data, "--target-ms", str(args.target_ms), "--steps", str(args.steps),
                        "--latency-model", str(args.latency_model), "--out", str(work / "search"),
                        "--device", args.device, "--workers", str(args.workers), "--threads", str(args.threads),
                        *shlex.split(args.search_args), *resume), work / "search.log")
    return arch


def _name(arch: Path) -> str:
    return "searched" if arch.parent.name == "search" else arch.stem


def train(args, arch: Path, work: Path) -> dict:
    out = work / "train" / _name(arch)
    if final_metrics(out) is None:
        resume = ["--resume", str(out)] if (out / "trainer_state.pt").is_file() else []
        extra = (["--epochs", str(args.epochs)] if args.epochs else []) + [f"--set={kv}" for kv in args.set]
        _run(_mobilezoo("train", args.recipe, "--arch", str(arch), "--data", args.data, "--out", str(out),
                        "--device", args.device,
                        "--workers", str(args.workers), "--threads", str(args.threads), *extra, *resume),
             work / f"{_name(arch)}.log")
    return final_metrics(out)


def search_and_train(args, work: Path) -> tuple[Path, dict]:
    arch = search(args, work)
    return arch, train(args, arch, work)


def run(args) -> dict:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lat_model = LatencyModel.load(args.latency_model)
    space = lat_model.space
    archs = []
    for i, c in enumerate(matched_random(lat_model, args.target_ms, args.tolerance, args.random, args.seed)):
        path = work / f"random_{i}.json"
        if not path.is_file():
            save_arch(to_arch(space, c), path, random={"seed": args.seed, "index": i})
        archs.append(path)
    if args.archs == "searched":
        archs = []
    with ThreadPoolExecutor(args.jobs) as pool:
        searched = pool.submit(search_and_train, args, work) if args.archs != "random" else None
        randoms = [pool.submit(train, args, a, work) for a in archs]
        rows = dict([searched.result()] if searched else [])
        rows.update(zip(archs, (f.result() for f in randoms)))
    device = args.training_device or args.device
    result_rows = []
    for path, m in rows.items():
        choices = from_arch(space, json.loads(path.read_text())["layers"])
        result_rows.append({"name": _name(path),
                            "predicted_ms": lat_model.predict(choices), "map": m["val_map"], "ap50": m["val_ap50"],
                            "epochs": m["epoch"], "trained_on": device, "choices": choices})
    meta = {k: getattr(args, k) for k in ("target_ms", "steps", "search_args", "tolerance", "seed", "recipe", "epochs",
                                          "set", "data")}
    meta.update(space=space.name, latency_model=Path(args.latency_model).name, runtime=lat_model.meta.get("runtime"),
                threads=lat_model.meta.get("threads"))
    return {"meta": meta, "rows": result_rows}


def merge(old: dict, new: dict) -> dict:
    """`new` plus the rows of `old` that `new` did not train (a benchmark split across machines)."""
    same = [k for k in new["meta"] if k not in SEARCH_ONLY]  # the search's settings do not change the random rows
    if any(old["meta"].get(k) != new["meta"][k] for k in same):
        raise SystemExit("cannot merge: the existing results were made with other settings "
                         f"({old['meta']} vs {new['meta']})")
    names = {r["name"] for r in new["rows"]}
    return {**new, "rows": new["rows"] + [r for r in old["rows"] if r["name"] not in names]}


def add_latency(result: dict, lat_model: LatencyModel, rounds: int = 5) -> dict:
    """Measure every row's architecture on this machine as the cost model was measured, in `rounds`
    interleaved rounds; `measured_ms` is the fastest round (noise on a shared machine only adds time:
    one round alone moved an architecture by up to 13%), `measured_rounds_ms` keeps them all."""
    for row in result["rows"]:
        row["measured_rounds_ms"] = []
    for _ in range(rounds):
        for row in result["rows"]:
            row["measured_rounds_ms"].append(measure_latency(
                to_arch(lat_model.space, row["choices"]), lat_model.meta.get("runtime", "torch"),
                lat_model.meta.get("threads", 1), lat_model.meta.get("size", 320)))
    for row in result["rows"]:
        row["measured_ms"] = min(row["measured_rounds_ms"])
    return result


def summarize(rows: list[dict], target_ms: float) -> dict:
    s = next(r for r in rows if r["name"] == "searched")
    randoms = [r for r in rows if r["name"] != "searched"]
    out = {"searched_map": s["map"], "random_maps": sorted(r["map"] for r in randoms),
           "beaten": sum(r["map"] < s["map"] for r in randoms), "of": len(randoms)}
    out["goal_beaten_met"] = out["beaten"] >= GOAL_BEATEN
    if "measured_ms" in s:
        out["searched_latency_error"] = s["measured_ms"] / target_ms - 1
        out["goal_latency_met"] = abs(out["searched_latency_error"]) <= GOAL_WITHIN
        out["random_matched"] = sum(abs(r["measured_ms"] / s["measured_ms"] - 1) <= GOAL_WITHIN for r in randoms)
    return out


def format_markdown(result: dict) -> str:
    m, s = result["meta"], result["summary"]
    search_args = f", `{m['search_args']}`" if m.get("search_args") else ""
    overrides = f" with `{' '.join(m['set'])}`" if m.get("set") else ""
    lines = [f"Search for {m['target_ms']:g} ms ({m['space']}, {m['steps']} steps{search_args}, cost model "
             f"`{m['latency_model']}`: {m['runtime']}, {m['threads']} threads); {s['of']} random architectures drawn "
             f"uniformly from the same space with a predicted latency within {m['tolerance']:.0%} of the target; all "
             f"trained with `{m['recipe']}`{overrides} ({result['rows'][0]['epochs']} epochs, same seed); measured "
             f"latency: the fastest of 5 interleaved rounds.", "",
             "| architecture | predicted ms | measured ms | val mAP | AP50 | trained on |",
             "|---|---:|---:|---:|---:|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["name"] != "searched", -r["map"])):
        ms = f"{r['measured_ms']:.1f}" if "measured_ms" in r else "-"
        name = f"**{r['name']}**" if r["name"] == "searched" else r["name"]
        lines.append(f"| {name} | {r['predicted_ms']:.1f} | {ms} | {r['map']:.3f} | {r['ap50']:.3f} "
                     f"| {r['trained_on']} |")
    lines.append("")
    verdict = [f"searched beats {s['beaten']} of {s['of']} random architectures in val mAP (goal {GOAL_BEATEN}: "
               f"{'met' if s['goal_beaten_met'] else 'not met'})"]
    if "goal_latency_met" in s:
        verdict.append(f"its measured latency is {s['searched_latency_error']:+.1%} off the target (goal within "
                       f"{GOAL_WITHIN:.0%}: {'met' if s['goal_latency_met'] else 'not met'}); {s['random_matched']} of "
                       f"{s['of']} random architectures measure within {GOAL_WITHIN:.0%} of it")
    return "\n".join(lines) + "\nResult: " + "; ".join(verdict) + "."


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = "measured_ms" if all("measured_ms" in r for r in result["rows"]) else "predicted_ms"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in result["rows"]:
        searched = r["name"] == "searched"
        ax.scatter(r[key], r["map"], s=80 if searched else 30, marker="*" if searched else "o",
                   color="C3" if searched else "C0", label="searched" if searched else None, zorder=3)
    t = result["meta"]["target_ms"]
    ax.axvspan(t * (1 - GOAL_WITHIN), t * (1 + GOAL_WITHIN), color="0.9", label="target +-10%")
    ax.set(xlabel=key.replace("_", " "), ylabel="val mAP@[.5:.95]", title="searched vs random, matched latency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-model", required=True, help="cost model JSON of the deployment machine")
    p.add_argument("--target-ms", type=float, help="latency target (required unless --latency-only)")
    p.add_argument("--steps", type=int, default=2000, help="search steps")
    p.add_argument("--search-args", default="", help="more `mobilezoo search` options, e.g. '--samples-per-step 4'")
    p.add_argument("--random", type=int, default=8, help="random architectures to compare with")
    p.add_argument("--tolerance", type=float, default=GOAL_WITHIN, help="matched latency: |predicted/target - 1|")
    p.add_argument("--recipe", default="detect_shapes", help="standalone training recipe for every architecture")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for every training")
    p.add_argument("--data", default="shapes")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
    p.add_argument("--archs", choices=["all", "searched", "random"], default="all",
                   help="search/train only these; the other rows are kept from OUT/search_vs_random.json")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--training-device", help="recorded per row instead of --device (e.g. the machine's name)")
    p.add_argument("--workers", type=int, default=2, help="loader processes per training / search")
    p.add_argument("--threads", type=int, default=2, help="torch threads per training / search")
    p.add_argument("--work", default=str(ROOT / "runs" / "search_vs_random"))
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement (not the target machine)")
    p.add_argument("--latency-only", action="store_true",
                   help="only measure the latency of the architectures in OUT/search_vs_random.json")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    out = args.out / "search_vs_random.json"
    if args.latency_only:
        if not out.is_file():
            raise SystemExit(f"{out}: no results to measure (run without --latency-only first)")
        result = json.loads(out.read_text())
    elif args.target_ms is None:
        raise SystemExit("--target-ms is required (unless --latency-only)")
    else:
        result = run(args)
        if args.archs != "all" and out.is_file():
            result = merge(json.loads(out.read_text()), result)
    if not args.no_latency:
        add_latency(result, LatencyModel.load(args.latency_model))
    result["summary"] = summarize(result["rows"], result["meta"]["target_ms"])
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out / "search_vs_random.png")
    print(format_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

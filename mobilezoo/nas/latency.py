"""Latency cost model of the search (TuNAS' linear cost model): measure random architectures, fit a linear model.

The model is TuNAS' `coupled_tf_features` regression: latency = b + sum over layer positions of
w[position][op, input width, output width], i.e. linear in the one-hot indicators of the
op x input-width x output-width cross product of every layer (a skipped layer is the op `skip`).
It is fit by (ridge) least squares on end-to-end latencies of randomly sampled architectures.
Because a few hundred measurements cannot pin down thousands of cross-product weights, the fit
also has the coarser one-hot groups (op, in, out, op x in, op x out, in x out) of each position;
each is a sum of cross-product indicators, so after the fit they fold back into the cross-product
tables and the saved model is exactly TuNAS' model (a hierarchical ridge prior on it).
"""
from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..layers.ibn import scale_filters
from .space import SearchSpace, canonical, get_space, layer_plan, sample, to_arch

SUBSETS = ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))  # of (op, in, out); the last is TuNAS'
RIDGE_GRID = (1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4)
FORMAT = "mobilezoo-latency-model-1"


def features(space: SearchSpace, choices) -> list[tuple[str, int, int]]:
    """(op, input width, output width) of each layer position of the canonical form of `choices`."""
    return [(p["op"], p["in"], p["out"]) for p in layer_plan(space, canonical(space, choices))]


def position_options(space: SearchSpace) -> list[list[tuple[str, int, int]]]:
    """Every (op, in, out) a layer position can take in the space."""
    widths = [sorted({space.width(b, m) for m in space.multipliers}) for b in range(len(space.skeleton))]
    out = []
    for b, block in enumerate(space.skeleton):
        for j in range(block.layers):
            ops = ("conv",) if b == 0 else space.layer_ops(b, j)
            if b == 0:
                pairs = [(3, w) for w in widths[0]]
            elif j == 0:
                pairs = list(itertools.product(widths[b - 1], widths[b]))
            else:
                pairs = [(w, w) for w in widths[b]]
            out.append([(op, i, o) for op in ops for i, o in pairs])
    return out


def analytic(space: SearchSpace, pos: int, f: tuple[str, int, int], size: int) -> np.ndarray:
    """(1x1 MACs / 1e6, full-conv MACs / 1e6, depthwise MACs / 1e6, activations / 1e5, convs) of a layer."""
    from .space import OPS
    strides = [b.stride if j == 0 else 1 for b in space.skeleton for j in range(b.layers)]
    r_in = size
    for s in strides[:pos]:
        r_in = math.ceil(r_in / s)
    r_out = math.ceil(r_in / strides[pos])
    op, cin, cout = f
    a_in, a_out = r_in * r_in, r_out * r_out
    pw = full = dw = mem = n = 0.0
    if op == "conv":
        full, mem, n = 9 * cin * cout * a_out, cout * a_out, 1
    elif op != "skip":
        spec = OPS[op]
        k, t = spec["kernel"], spec["type"]
        if t == "ibn_noexp":
            dw, pw, mem, n = k * k * cin * a_out, cin * cout * a_out, (cin + cout) * a_out, 2
        elif t == "ibn":
            h = int(cin * spec["expansion"])
            pw, dw = cin * h * a_in + h * cout * a_out, k * k * h * a_out
            mem, n = h * a_in + h * a_out + cout * a_out, 3
        elif t == "fused":
            h = int(cin * spec["expansion"])
            full, pw, mem, n = k * k * cin * h * a_out, h * cout * a_out, (h + cout) * a_out, 2
        else:
            ra, rb = scale_filters(cin, spec["ratios"][0]), scale_filters(cout, spec["ratios"][1])
            pw, full = cin * ra * a_in + rb * cout * a_out, k * k * ra * rb * a_out
            mem, n = ra * a_in + (rb + cout) * a_out, 3
    return np.array([pw / 1e6, full / 1e6, dw / 1e6, mem / 1e5, n])


def _key(f) -> str:
    return f"{f[0]}|{f[1]}|{f[2]}"


class LatencyModel:
    """Linear latency model: `intercept` + per position a table {"op|in|out": ms}."""

    def __init__(self, space: SearchSpace, intercept: float, tables: list[dict[str, float]], meta: dict | None = None):
        self.space, self.intercept, self.tables, self.meta = get_space(space), float(intercept), tables, meta or {}
        if len(tables) != self.space.num_positions:
            raise UserError(f"latency model has {len(tables)} layer tables, space {self.space.name} has "
                            f"{self.space.num_positions} layer positions")

    def predict(self, choices) -> float:
        """Predicted latency (ms) of a choice vector."""
        total = self.intercept
        for i, (table, f) in enumerate(zip(self.tables, features(self.space, choices))):
            if _key(f) not in table:
                raise UserError(f"latency model has no entry for layer position {i} = {_key(f)}; "
                                f"was it fit for search space {self.space.name}?")
            total += table[_key(f)]
        return total

    @classmethod
    def fit(cls, space, choices: list, latencies: list[float], ridge="auto", seed: int = 0,
            size: int = 320) -> LatencyModel:
        """Least-squares fit on measured (choice vector, latency) pairs; ridge 0 is plain (minimum-norm)
        least squares on the cross-product features only, "auto" picks the ridge strength by 5-fold cross-validation."""
        space = get_space(space)
        # Plain least squares fits TuNAS' cross-product features alone (the coarser groups only
        # matter as a prior, i.e. with a ridge penalty).
        subsets = SUBSETS[-1:] if ridge == 0 else SUBSETS
        if len(choices) != len(latencies) or len(choices) < 2:
            raise UserError(f"need at least 2 (architecture, latency) pairs, got {len(choices)} and {len(latencies)}")
        options = position_options(space)
        columns: dict[tuple, int] = {}
        for pos, opts in enumerate(options):
            for f in opts:
                for s in subsets:
                    columns.setdefault((pos, s, tuple(f[k] for k in s)), len(columns))
        X = np.zeros((len(choices), len(columns)))
        for r, c in enumerate(choices):
            for pos, f in enumerate(features(space, c)):
                for s in subsets:
                    X[r, columns[(pos, s, tuple(f[k] for k in s))]] = 1.0
        y = np.asarray(latencies, dtype=np.float64)
        cost = {(pos, f): analytic(space, pos, f, size) for pos, opts in enumerate(options) for f in opts}
        A = np.ones((len(choices), 1))
        if ridge != 0:
            A = np.hstack([A, np.array([sum(cost[(pos, f)] for pos, f in enumerate(features(space, c)))
                                        for c in choices])])
        if ridge == "auto":
            ridge = _cross_validate(A, X, y, seed)
        a, w = _solve(A, X, y, float(ridge))
        tables = []
        for pos, opts in enumerate(options):
            tables.append({_key(f): float(sum(w[columns[(pos, s, tuple(f[k] for k in s))]] for s in subsets)
                                          + (cost[(pos, f)] @ a[1:] if len(a) > 1 else 0.0))
                           for f in opts})
        return cls(space, float(a[0]), tables, {"ridge": float(ridge), "samples": len(choices), "size": size})

    def to_dict(self) -> dict:
        """JSON-serialisable form (what `load` reads)."""
        return {"format": FORMAT, "space": self.space.to_dict(), "intercept_ms": self.intercept,
                "tables": self.tables, "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        """Write the model as JSON (atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatencyModel:
        """Read a model written by `save`; UserError naming the file and field when it is not one."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read latency model JSON ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise UserError(f"{path}: not a latency model (expected \"format\": \"{FORMAT}\")")
        for k, t in (("space", dict), ("intercept_ms", (int, float)), ("tables", list)):
            if not isinstance(d.get(k), t):
                raise UserError(f"{path}: field '{k}' missing or of the wrong type")
        try:
            return cls(d["space"], d["intercept_ms"], d["tables"], d.get("meta"))
        except UserError as e:
            raise UserError(f"{path}: {e}") from None


def _solve(A: np.ndarray, X: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """min |y - A a - X w|^2 + ridge |w|^2 with A unpenalised (Frisch-Waugh: project A out first)."""
    Q, _ = np.linalg.qr(A)
    Xp, yp = X - Q @ (Q.T @ X), y - Q @ (Q.T @ y)
    if ridge <= 0:
        w = np.linalg.lstsq(Xp, yp, rcond=None)[0]
    else:  # dual form: an n x n system, n = number of measurements
        w = Xp.T @ np.linalg.solve(Xp @ Xp.T + ridge * np.eye(Xp.shape[0]), yp)
    a = np.linalg.lstsq(A, y - X @ w, rcond=None)[0]
    return a, w


def _cross_validate(A: np.ndarray, X: np.ndarray, y: np.ndarray, seed: int, folds: int = 5) -> float:
    idx = np.random.default_rng(seed).permutation(len(y))
    parts = np.array_split(idx, min(folds, len(y)))
    best = (math.inf, RIDGE_GRID[0])
    for lam in RIDGE_GRID:
        err = 0.0
        for p in parts:
            train = np.setdiff1d(idx, p)
            a, w = _solve(A[train], X[train], y[train], lam)
            err += float(((A[p] @ a + X[p] @ w - y[p]) ** 2).sum())
        best = min(best, (err, lam))
    return best[1]


def fit_report(measured, predicted) -> dict:
    """r^2, mean absolute error (ms and % of the mean latency) of predictions."""
    m, p = np.asarray(measured, float), np.asarray(predicted, float)
    ss_res, ss_tot = float(((m - p) ** 2).sum()), float(((m - m.mean()) ** 2).sum())
    mae = float(np.abs(m - p).mean())
    return {"r2": 1 - ss_res / ss_tot if ss_tot > 0 else float("nan"), "mae_ms": mae,
            "mae_pct": 100 * mae / float(m.mean()), "mean_ms": float(m.mean()), "count": len(m)}


# --- measurement ------------------------------------------------------------------------------------

def _torch_runner(model, x):
    from ..layers.fuse import fuse_for_inference
    net = fuse_for_inference(model)
    return lambda: net.head_outputs(x)


def _ort_runner(model, x, threads: int):
    """The detector network as deployed to ONNX Runtime: `export_onnx`'s raw-heads graph (BN folded)."""
    import tempfile

    from ..deploy.export import export_onnx
    from ..deploy.ort import OrtModel
    from ..tasks.detection import DetectionTask
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "net.onnx"
        export_onnx(model, x, path, DetectionTask, mode=DetectionTask.int8_mode, check=False)
        session = OrtModel(path, threads=threads)  # the session keeps the graph in memory
    feed = x.numpy()
    return lambda: session.run(feed)


def measure_latency(arch: list[dict], runtime: str = "torch", threads: int = 1, size: int = 320,
                    iters: int = 10, warmup: int = 3) -> float:
    """Fastest of `iters` batch-1 runs (ms) of the detector network of `arch` (backbone, extra layers, heads)
    at size x size; BN folded (torch) or exported to ONNX (onnxruntime). Resize and NMS cost the
    same for every architecture and are left out. The minimum, not the median: on a shared machine the
    noise only ever adds time."""
    from ..models.ssdlite import ssdlite_mobiledet
    if runtime not in ("torch", "onnxruntime"):
        raise UserError(f"runtime must be torch or onnxruntime, got {runtime!r}")
    from ..bench.threads import num_threads
    from ..bench.timing import time_calls
    model = ssdlite_mobiledet(arch, num_classes=90).eval()
    x = torch.randn(1, 3, size, size)
    with num_threads(threads), torch.no_grad():  # not inference_mode: fused convs read weight versions
        run = _torch_runner(model, x) if runtime == "torch" else _ort_runner(model, x, threads)
        time_calls(lambda _: run(), None, warmup)
        return 1e3 * min(time_calls(lambda _: run(), None, iters))


def plot_fit(measured_train, predicted_train, measured_test, predicted_test, path: str | Path, title: str) -> Path:
    """Predicted vs measured latency scatter (train and held-out) with the y = x line, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(measured_train, predicted_train, s=12, c="0.6", label="fit set")
    ax.scatter(measured_test, predicted_test, s=18, c="tab:red", label="held out")
    lo = min(*measured_train, *measured_test, *predicted_train, *predicted_test)
    hi = max(*measured_train, *measured_test, *predicted_train, *predicted_test)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="measured latency (ms)", ylabel="predicted latency (ms)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def fit_latency_model(runtime: str = "torch", threads: int = 1, samples: int = 80,
                      out_path: str | Path = "latency_model.json", space="ibn_fused_tucker",
                      heldout: float = 0.25, size: int = 320, iters: int = 10, warmup: int = 3,
                      seed: int = 0, ridge="auto", progress: bool = True) -> dict:
    """Measure `samples` random architectures, fit on (1 - heldout) of them, report on the rest.

    Writes the model JSON (with the measurements in its meta) to `out_path` and a predicted-vs-
    measured plot beside it; returns r2 / mae_ms / mae_pct on the held-out architectures and paths."""
    from tqdm import tqdm
    space = get_space(space)
    if samples < 4 or not 0 < heldout < 1:
        raise UserError(f"need samples >= 4 and 0 < heldout < 1, got {samples} and {heldout}")
    rng = random.Random(seed)
    archs = [sample(space, rng) for _ in range(samples)]
    lat = []
    for c in tqdm(archs, desc=f"latency ({runtime}, {threads} thr)", disable=not progress):
        lat.append(measure_latency(to_arch(space, c), runtime, threads, size, iters, warmup))
    n_test = max(1, round(samples * heldout))
    train, test = slice(0, samples - n_test), slice(samples - n_test, samples)
    model = LatencyModel.fit(space, archs[train], lat[train], ridge=ridge, seed=seed, size=size)
    pred = [model.predict(c) for c in archs]
    report = fit_report(lat[test], pred[test])
    report["train"] = fit_report(lat[train], pred[train])
    out_path = Path(out_path)
    model.meta.update(runtime=runtime, threads=threads, size=size, heldout=report,
                      measurements=[{"choices": c, "ms": m} for c, m in zip(archs, lat)])
    model.save(out_path)
    plot = plot_fit(lat[train], pred[train], lat[test], pred[test], out_path.with_suffix(".png"),
                    f"{runtime}, {threads} thread(s): held-out r2 {report['r2']:.3f}, MAE {report['mae_pct']:.1f}%")
    return {**report, "runtime": runtime, "threads": threads, "samples": samples, "ridge": model.meta["ridge"],
            "model_path": str(out_path), "plot_path": str(plot)}

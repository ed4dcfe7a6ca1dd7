"""Peak training memory and step time of revunet3d, its plain twin and MONAI's SegResNet, and the
paper's question: how much larger a reversible net fits in the plain one's memory.

    python benchmarks/revunet_memory.py            # reference crop 128^3 (~25 min on a busy 2-core CPU)
    python benchmarks/revunet_memory.py --quick    # the same question at 48^3 (~5 min)

Writes OUT/revunet_memory.json (meta, rows, answer, overhead) and OUT/revunet_memory.md (README
section); `make bench-memory` runs it.

Every configuration runs in a fresh process, forked from a server (this file with --serve) that has
imported torch and the models once and never computes: build the model, run a tiny warm-up step
(kernels loaded, `.grad` buffers allocated), allocate input and target, then time one training step
(forward, BCE-with-logits on 3 regions, backward). CPU: peak RSS above the RSS just before the step,
with glibc's mmap threshold fixed at 64 KiB so that freed activations go back to the OS and RSS
follows the live tensors. CUDA: `torch.cuda.max_memory_allocated` above `memory_allocated` at that
point. Models and tensors are channels_last_3d by default: on CPU the backward of a depthwise 3D
convolution is ~75x slower in the contiguous format, which would swamp every step time.

`memory_benchmark` answers the paper's question (Pendse et al.: "3x larger volumes, 2x channels,
25% more depth" at a fixed memory budget): the budget is the plain twin's peak at the reference
crop, and for the reversible net it finds the largest crop, width and couplings per level whose
measured peak stays within it.
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import json
import math
import os
import resource
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilezoo.bench.markdown import Column, table  # noqa: E402
from mobilezoo.bench.threads import num_threads  # noqa: E402
from mobilezoo.bench.timing import time_calls  # noqa: E402

REVERSIBLE, PLAIN, SEGRESNET = "revunet3d", "unet3d_mbconv", "segresnet"
MODELS = (REVERSIBLE, PLAIN, SEGRESNET)
BASE_CHANNELS, BASE_ENCODER, BASE_DECODER = (16, 32, 64, 128), (1, 1, 2, 4), (1, 1, 1)
# MONAI's BraTS tutorial (3d_segmentation/brats_segmentation_3d.ipynb): the model users would pick
SEGRESNET_KWARGS = dict(spatial_dims=3, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16,
                        in_channels=4, out_channels=3, dropout_prob=0.2)
PAPER = {"volume_x": 3.0, "channels_x": 2.0, "depth_x": 1.25}  # Pendse et al., abstract
IN_CHANNELS, OUT_CHANNELS = 4, 3
STEP = 8  # crop granularity of the search: the default U-Nets and SegResNet halve the crop 3 times
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
# Presets of `memory_report`: the full run answers the paper's question at 128^3 (~25 min on a busy
# 2-core CPU, most of it in the search probes at 200^3 and at 128^3 with 3-4x channels or 4x
# couplings; ~10 GiB of RAM); the quick one asks the same question at 48^3 (~5 min, ~0.7 GiB).
FULL = dict(ref_crop=128, sweep_widths=(2,), sweep_depths=(4,), depths=(1.25, 1.5, 2, 4))
QUICK = dict(ref_crop=48, crops=(24, 32, 48), sweep_crop=24, sweep_widths=(2,), sweep_depths=(4,),
             depths=(1.25, 1.5, 2, 4), overhead_crop=32, overhead_steps=2)


def width_channels(width: float) -> tuple[int, ...]:
    """Level widths for a width multiplier (they must stay multiples of 16 for GroupNorm(8) on C/2)."""
    return tuple(int(round(c * width)) for c in BASE_CHANNELS)


def depth_blocks(depth: float) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(encoder_blocks, decoder_blocks) for a multiplier of the couplings per level (half rounds up)."""
    scale = lambda blocks: tuple(max(1, math.floor(b * depth + 0.5)) for b in blocks)
    return scale(BASE_ENCODER), scale(BASE_DECODER)


def couplings(encoder_blocks: Sequence[int], decoder_blocks: Sequence[int]) -> int:
    """Total couplings of a configuration."""
    return sum(encoder_blocks) + sum(decoder_blocks)


def build_model(model_name: str, channels=None, encoder_blocks=None, decoder_blocks=None) -> torch.nn.Module:
    """revunet3d / unet3d_mbconv (optionally resized) or the tutorial's SegResNet."""
    if model_name == SEGRESNET:
        if channels or encoder_blocks or decoder_blocks:
            raise ValueError("segresnet is benchmarked as MONAI's BraTS tutorial configures it; "
                             "channels / encoder_blocks / decoder_blocks apply to revunet3d and unet3d_mbconv")
        from monai.networks.nets import SegResNet
        return SegResNet(**SEGRESNET_KWARGS)
    if model_name not in (REVERSIBLE, PLAIN):
        raise ValueError(f"memory benchmark: unknown model {model_name!r}, expected one of {MODELS}")
    from mobilezoo.models.revunet3d import RevUNet3d
    return RevUNet3d(channels=channels or BASE_CHANNELS, encoder_blocks=encoder_blocks or BASE_ENCODER,
                     decoder_blocks=decoder_blocks or BASE_DECODER, in_channels=IN_CHANNELS,
                     out_channels=OUT_CHANNELS, reversible=model_name == REVERSIBLE)


def _divisor(model_name: str, channels) -> int:
    return STEP if model_name == SEGRESNET else 2 ** (len(channels or BASE_CHANNELS) - 1)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


def _reset_peak() -> bool:
    """Reset this process's RSS high-water mark (VmHWM) to its current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _train_step(model, x, target) -> None:
    F.binary_cross_entropy_with_logits(model(x), target).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_here(model_name: str, crop: int, channels=None, encoder_blocks=None, decoder_blocks=None,
                  batch: int = 1, device: str = "cpu", steps: int = 1, threads: int = 2,
                  limit_mib: float | None = None, channels_last: bool = True) -> dict:
    """One configuration in this process (meant to be a fresh one): peak MiB above baseline, step s."""
    dev = torch.device(device)
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = build_model(model_name, channels, encoder_blocks, decoder_blocks).to(dev, memory_format=fmt).train()
    tiny = (_divisor(model_name, channels),) * 3
    _train_step(model, torch.randn(1, IN_CHANNELS, *tiny, device=dev).contiguous(memory_format=fmt),
                torch.rand(1, OUT_CHANNELS, *tiny, device=dev).contiguous(memory_format=fmt))
    shape = (crop,) * 3
    x = torch.randn(batch, IN_CHANNELS, *shape, device=dev).contiguous(memory_format=fmt)
    target = (torch.rand(batch, OUT_CHANNELS, *shape, device=dev) > 0.5).float().contiguous(memory_format=fmt)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev) / 2**20
        if limit_mib is not None:
            total = torch.cuda.get_device_properties(dev).total_memory / 2**20
            torch.cuda.set_per_process_memory_fraction(min(1.0, (base + limit_mib) / total), dev)
    else:
        base = _status_mib("VmRSS")
        if limit_mib is not None:  # cap address-space growth: a run past the cap fails early, not the machine
            cap = int((_status_mib("VmSize") + limit_mib) * 2**20)
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
        hwm = _reset_peak()
    times = []
    for _ in range(steps):
        model.zero_grad(set_to_none=False)  # untimed: the step is what is measured
        times += time_calls(lambda batch: (_train_step(model, *batch), _sync(dev)), (x, target), 1)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 - base
    else:
        peak = (_status_mib("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) - base
    seg = model_name == SEGRESNET
    return {"model": model_name, "crop": crop, "batch": batch, "device": str(dev), "threads": threads,
            "channels_last": channels_last, "channels": None if seg else list(model.channels),
            "encoder_blocks": None if seg else list(encoder_blocks or BASE_ENCODER),
            "decoder_blocks": None if seg else list(decoder_blocks or BASE_DECODER),
            "params": sum(p.numel() for p in model.parameters()), "baseline_mib": round(base, 1),
            "peak_mib": round(peak, 1), "first_step_s": round(times[0], 3),
            "step_s": round(statistics.median(times[1:] or times), 3),
            "min_step_s": round(min(times[1:] or times), 3), "steps": steps}


class _ForkServer:
    """A child interpreter that imports torch and the models once, then forks one fresh worker per
    configuration: workers never start from a process that ran OpenMP work or holds freed heaps."""

    def __init__(self):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        atexit.register(self.close)

    def request(self, kwargs: dict, timeout: float | None) -> dict:
        """Measure in a fresh worker; an error row if it fails, dies or runs past `timeout` s."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"memory benchmark fork server exited with status {self.proc.returncode}")
        self.proc.stdin.write(json.dumps(kwargs) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            os.kill(pid, signal.SIGKILL)  # our own worker; the server then reports it as died
            self.proc.stdout.readline()
            return {"error": f"timeout after {timeout} s"}
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        """End the server (it exits when its input closes)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def _serve() -> None:
    """Fork-server loop: one JSON request per input line -> worker pid line, then result line."""
    import monai.networks.nets  # noqa: F401  (imported once here, not in every worker)

    for line in sys.stdin:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: stdout belongs to the protocol, so its prints go to stderr
            os.close(read)
            os.dup2(2, 1)
            try:
                ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 65536)  # as the environment asked
            except (OSError, AttributeError):
                pass
            try:
                request = json.loads(line)
                with num_threads(request["threads"]):
                    out = _measure_here(**request)
            except (MemoryError, RuntimeError) as e:  # torch's "can't allocate memory" and CUDA OOM
                out = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
            except Exception as e:  # noqa: BLE001  (reported, not raised: the server must go on)
                out = {"error": f"{type(e).__name__}: {e}"}
            with os.fdopen(write, "w") as fh:
                fh.write(json.dumps(out))
            os._exit(0)
        os.close(write)
        print(json.dumps({"pid": pid}), flush=True)
        with os.fdopen(read) as fh:
            data = fh.read()
        status = os.waitpid(pid, 0)[1]
        print(data if data else json.dumps({"error": f"worker died (wait status {status})"}), flush=True)


_SERVER: _ForkServer | None = None


def measure_step(model_name: str, crop: int, channels: Sequence[int] | None = None,
                 encoder_blocks: Sequence[int] | None = None, decoder_blocks: Sequence[int] | None = None,
                 batch: int = 1, device: str = "cpu", steps: int = 1, threads: int = 2,
                 limit_mib: float | None = None, channels_last: bool = True, timeout: float | None = None) -> dict:
    """Peak training memory (MiB above baseline) and step time of one configuration, in a fresh process.

    The row has `peak_mib`, `first_step_s` and `step_s` (median after the first of `steps`), or
    `error` (and `peak_mib` None) when the step did not finish: past `limit_mib`, out of memory, or
    past `timeout` s. `channels_last`: model and tensors in channels_last_3d (much faster depthwise
    3D convolutions on CPU).
    """
    global _SERVER
    kwargs = dict(model_name=model_name, crop=crop, channels=list(channels) if channels else None,
                  encoder_blocks=list(encoder_blocks) if encoder_blocks else None,
                  decoder_blocks=list(decoder_blocks) if decoder_blocks else None, batch=batch,
                  device=device, steps=steps, threads=threads, limit_mib=limit_mib, channels_last=channels_last)
    build_model(model_name, kwargs["channels"], kwargs["encoder_blocks"], kwargs["decoder_blocks"])  # user errors
    if crop % _divisor(model_name, channels):
        raise ValueError(f"crop {crop}: {model_name} needs a crop divisible by {_divisor(model_name, channels)}")
    if _SERVER is None:
        _SERVER = _ForkServer()
    row = _SERVER.request(kwargs, timeout)
    if "error" in row:
        seg = model_name == SEGRESNET
        row.update(model=model_name, crop=crop, peak_mib=None, limit_mib=limit_mib,
                   channels=None if seg else list(channels or BASE_CHANNELS),
                   encoder_blocks=None if seg else list(encoder_blocks or BASE_ENCODER),
                   decoder_blocks=None if seg else list(decoder_blocks or BASE_DECODER))
    return row


def find_largest(n: int, fits: Callable[[int], bool], guess: int | None = None) -> int:
    """Largest index i < n with fits(i), for fits true up to some index and false after; -1 if none.

    Probes `guess` and its neighbour first (two probes when the guess is right), then bisects.
    """
    lo, hi = -1, n  # fits(lo) known true, fits(hi) known false (sentinels outside the range)

    def probe(i: int) -> None:
        nonlocal lo, hi
        if fits(i):
            lo = max(lo, i)
        else:
            hi = min(hi, i)

    if guess is not None and n:
        g = min(max(guess, 0), n - 1)
        probe(g)
        neighbour = g + 1 if lo == g else g - 1
        if lo < neighbour < hi:
            probe(neighbour)
    while hi - lo > 1:
        probe((lo + hi) // 2)
    return lo


def _linear_guess(xs: Sequence[float], ys: Sequence[float], candidates: Sequence[float], budget: float) -> int:
    """Index of the last candidate whose least-squares-line prediction is within budget (0 if none)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    fit = [i for i, c in enumerate(candidates) if my + slope * (c - mx) <= budget]
    return fit[-1] if fit else 0


def _depth_couplings(depth: float) -> int:
    return couplings(*depth_blocks(depth))


def _meminfo_mib(field: str) -> float:
    with open("/proc/meminfo") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024


def _safe_limit(device: str) -> float | None:
    """A cap that keeps a CPU run from pushing the machine into the OOM killer."""
    if device != "cpu":
        return None
    try:
        return 0.85 * _meminfo_mib("MemAvailable")
    except (OSError, StopIteration):
        return None


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


class _FlopCounter(TorchDispatchMode):
    """FLOPs of every op torch's flop registry knows (FlopCounterMode without its module tracker,
    which cannot follow the modules run inside a custom autograd Function's forward)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def recompute_estimate(crop: int = 16) -> dict:
    """RevNet's step-time estimate for this network: a plain step costs forward F + backward 2F, the
    reversible one also re-runs the couplings' forward R, so 1 + R / 3F (4/3 when every layer is a
    coupling). R = FLOPs of a reversible step minus those of a plain one (same weights and input)."""
    torch.manual_seed(0)
    x, target = torch.randn(1, IN_CHANNELS, crop, crop, crop), torch.rand(1, OUT_CHANNELS, crop, crop, crop)
    model, step = build_model(REVERSIBLE), {}
    for reversible in (True, False):
        model.reversible = reversible
        with _FlopCounter() as counter:
            _train_step(model, x, target)
        step[reversible] = counter.total
    with _FlopCounter() as counter, torch.no_grad():
        model(x)
    forward, recompute = counter.total, step[True] - step[False]
    return {"crop": crop, "forward_gflop": round(forward / 1e9, 4), "recompute_gflop": round(recompute / 1e9, 4),
            "recompute_fraction": round(recompute / forward, 3), "ratio": round(1 + recompute / (3 * forward), 3)}


def _fits(row: dict | None, budget: float) -> bool:
    return row is not None and row.get("peak_mib") is not None and row["peak_mib"] <= budget


def _summary(row: dict | None) -> dict | None:
    keep = ("crop", "width", "depth", "channels", "encoder_blocks", "decoder_blocks", "couplings", "params",
            "peak_mib", "first_step_s", "error")
    return None if row is None else {k: row[k] for k in keep if row.get(k) is not None}


def memory_benchmark(ref_crop: int = 128, crops: Sequence[int] | None = None,
                     widths: Sequence[float] = (2, 3, 4, 5, 6), depths: Sequence[float] = (1.25, 1.5, 2, 3, 4),
                     sweep_crop: int | None = None, sweep_widths: Sequence[float] = (2, 3),
                     sweep_depths: Sequence[float] = (2, 4), max_crop: int | None = None,
                     overhead_crop: int | None = None, overhead_steps: int = 3, overhead_rounds: int = 2,
                     batch: int = 1, device: str = "cpu", threads: int = 2, channels_last: bool = True,
                     flop_estimate: bool = True, measure: Callable[..., dict] = measure_step,
                     log: Callable[[str], None] | None = None) -> dict:
    """Sweep crop, width and couplings per level, then answer the paper's question at `ref_crop`.

    Crop sweep (`crops`, default ref/2, 3ref/4, ref): all three models. Width and depth sweeps at
    `sweep_crop` (default ref/2): both U-Nets. Budget: the plain twin's peak at `ref_crop`. Then the
    reversible net at `ref_crop` is searched for the largest crop (ref..`max_crop`, default 2 ref, in
    steps of 8), width multiplier (`widths`) and couplings multiplier (`depths`) within the budget:
    a line through the measurements so far picks the first probe, measurement decides (the answer
    fits, the next candidate does not). Step-time overhead: `overhead_rounds` fresh processes per
    model, alternating, each timing `overhead_steps` steps after a warm-up step at `overhead_crop`
    (default ref/2), plus `recompute_estimate` when `flop_estimate`.
    Returns {"meta", "rows", "answer", "overhead"}; `measure` is `measure_step` or a stand-in.
    """
    say = log or (lambda msg: None)
    near = lambda side: max(STEP, STEP * round(side / STEP))  # a crop every model here takes
    crops = sorted(set(crops or (near(ref_crop / 2), near(3 * ref_crop / 4))) | {ref_crop})
    sweep_crop, overhead_crop = sweep_crop or near(ref_crop / 2), overhead_crop or near(ref_crop / 2)
    max_crop = max_crop or 2 * ref_crop
    common = dict(batch=batch, device=device, threads=threads, channels_last=channels_last)
    rows: list[dict] = []
    t_start = time.time()

    def run(purpose: str, model: str, crop: int, width: float = 1, depth: float = 1, limit=None) -> dict:
        seg = model == SEGRESNET
        for row in rows:  # each configuration is measured once
            if (row["model"], row["crop"], row["width"], row["depth"]) == (
                    model, crop, None if seg else width, None if seg else depth):
                return row
        enc, dec = depth_blocks(depth)
        spec = {} if seg else dict(channels=width_channels(width), encoder_blocks=enc, decoder_blocks=dec)
        row = measure(model, crop, limit_mib=limit, **common, **spec)
        row.update(purpose=purpose, width=None if seg else width, depth=None if seg else depth,
                   couplings=None if seg else couplings(enc, dec))
        rows.append(row)
        peak = "-" if row.get("peak_mib") is None else f"{row['peak_mib']:.0f} MiB"
        say(f"{purpose:6s} {model:13s} {crop:3d}^3 width x{width:g} couplings x{depth:g}: {peak:>9s} "
            f"{row.get('error', '')} [{time.time() - t_start:.0f} s]")
        return row

    # 1. crop sweep, the plain twin's reference first: its peak is the budget
    ref = run("crop", PLAIN, ref_crop, limit=_safe_limit(device))
    if ref.get("peak_mib") is None:
        raise RuntimeError(f"the plain twin at {ref_crop}^3 did not finish ({ref.get('error')}); "
                           "choose a smaller reference crop")
    budget = ref["peak_mib"]
    cap = 1.1 * budget + 128  # a search probe past this cannot fit the budget: stop it there
    for model in (REVERSIBLE, PLAIN, SEGRESNET):
        for crop in crops:
            run("crop", model, crop, limit=_safe_limit(device))
    # 2. width and depth growth at the sweep crop, both U-Nets
    for model in (REVERSIBLE, PLAIN):
        run("crop", model, sweep_crop, limit=_safe_limit(device))
        for w in sweep_widths:
            run("width", model, sweep_crop, width=w, limit=_safe_limit(device))
        for d in sweep_depths:
            run("depth", model, sweep_crop, depth=d, limit=_safe_limit(device))

    # 3. the question, for the reversible net at the reference crop
    rev_ref = run("crop", REVERSIBLE, ref_crop, limit=cap)
    seg_ref = next((r for r in rows if r["model"] == SEGRESNET and r["crop"] == ref_crop), None)
    answer: dict = {"reference": {"model": PLAIN, "crop": ref_crop, "peak_mib": budget}, "paper": PAPER,
                    "reversible_at_reference": _summary(rev_ref), "segresnet_at_reference": _summary(seg_ref)}

    def at_ref(axis: str, value) -> dict:
        return run("search", REVERSIBLE, limit=cap, **{"crop": ref_crop, axis: value})

    def search(axis: str, candidates: list, points: list[tuple[float, float]], x_of=lambda v: v) -> tuple:
        guess = _linear_guess(*zip(*points), [x_of(c) for c in candidates], budget) if len(points) >= 2 else None
        i = find_largest(len(candidates), lambda k: _fits(at_ref(axis, candidates[k]), budget), guess)
        value = candidates[i] if i >= 0 else (ref_crop if axis == "crop" else 1)
        nxt = candidates[i + 1] if i + 1 < len(candidates) else None  # measured by the search already
        return value, {"fits": _summary(at_ref(axis, value)), "next": _summary(nxt and at_ref(axis, nxt)),
                       "largest_tried": nxt is None}

    def depth_points() -> list[tuple[float, float]]:
        """(couplings, peak) of the reversible depth sweep, peaks scaled to the reference crop."""
        same = [r for r in rows if r["model"] == REVERSIBLE and r["crop"] == sweep_crop and r.get("peak_mib")
                and r["width"] == 1]
        base = next((r for r in same if r["depth"] == 1), None)
        return [] if base is None else [(r["couplings"], r["peak_mib"] * rev_ref["peak_mib"] / base["peak_mib"])
                                        for r in same]

    if not _fits(rev_ref, budget):
        answer["note"] = "the reversible net does not fit the plain twin's budget at the reference crop"
    else:
        sides = list(range(ref_crop + STEP, max_crop + 1, STEP))
        points = [(r["crop"] ** 3, r["peak_mib"]) for r in rows if r["model"] == REVERSIBLE
                  and r["width"] == 1 and r["depth"] == 1 and r.get("peak_mib")]
        side, info = search("crop", sides, points, lambda c: c ** 3)
        answer["crop"] = {"side": side, "volume_x": round((side / ref_crop) ** 3, 3), **info}
        # activations grow in proportion to the width (a line through the sweep's small crop would
        # carry its fixed overheads over to the reference crop)
        w, info = search("width", sorted(w for w in widths if w > 1), [(0, 0), (1, rev_ref["peak_mib"])])
        answer["width"] = {"multiplier": w, "channels": list(width_channels(w)), "channels_x": w, **info}
        d, info = search("depth", sorted(d for d in depths if d > 1), depth_points(), _depth_couplings)
        enc, dec = depth_blocks(d)
        answer["depth"] = {"multiplier": d, "encoder_blocks": list(enc), "decoder_blocks": list(dec),
                           "couplings": _depth_couplings(d),
                           "depth_x": round(_depth_couplings(d) / _depth_couplings(1), 3), **info}
        answer["beats_paper"] = {"volume": answer["crop"]["volume_x"] > PAPER["volume_x"],
                                 "channels": answer["width"]["channels_x"] > PAPER["channels_x"],
                                 "depth": answer["depth"]["depth_x"] > PAPER["depth_x"]}

    # 4. step-time overhead of reversibility: measured, and RevNet's FLOP estimate for this network
    say(f"overhead: {overhead_rounds} fresh processes x {overhead_steps} timed steps per model at {overhead_crop}^3")
    times: dict[str, list[dict]] = {REVERSIBLE: [], PLAIN: []}
    for r in range(overhead_rounds):
        for model in (REVERSIBLE, PLAIN) if r % 2 == 0 else (PLAIN, REVERSIBLE):
            row = measure(model, overhead_crop, steps=overhead_steps + 1, **common)
            if row.get("step_s") is not None:
                times[model].append({k: row.get(k) for k in ("step_s", "min_step_s")})
    overhead = {"crop": overhead_crop, "steps": overhead_steps, "rounds": overhead_rounds, "per_process": times}
    for key, pick in (("step_s", "step_s"), ("min_step_s", "min_step_s")):
        rev, plain = ([t[pick] for t in times[m] if t.get(pick) is not None] for m in (REVERSIBLE, PLAIN))
        agg = _median if key == "step_s" else (lambda v: min(v) if v else None)
        overhead[f"reversible_{key}"], overhead[f"plain_{key}"] = agg(rev), agg(plain)
    overhead["ratio"] = _ratio(overhead["reversible_step_s"], overhead["plain_step_s"])
    overhead["ratio_of_fastest"] = _ratio(overhead["reversible_min_step_s"], overhead["plain_min_step_s"])
    overhead["flop_estimate"] = recompute_estimate() if flop_estimate else None
    say(f"overhead: {overhead['ratio']}x (fastest steps {overhead['ratio_of_fastest']}x)")
    meta = {"ref_crop": ref_crop, "sweep_crop": sweep_crop, "crops": crops, "search_max_crop": max_crop,
            "cap_mib": round(cap, 1), "torch": torch.__version__, "seconds": round(time.time() - t_start),
            "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None, **common}
    return {"meta": meta, "rows": rows, "answer": answer, "overhead": overhead}


def _mib(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{row['peak_mib']:,.0f}" if row.get("peak_mib") is not None else "> cap"


def _crossing(x0: float, y0: float, x1: float, y1: float, budget: float) -> float | None:
    """Where the line through (x0, y0) and (x1, y1) reaches `budget`."""
    return None if y1 == y0 else x0 + (budget - y0) * (x1 - x0) / (y1 - y0)


def interpolated(result: dict) -> dict:
    """Where the budget falls between the last fitting and the first failing probe (or, past the largest
    probe, on the line through the reference and the largest): volume_x, channels_x, couplings, depth_x."""
    a = result["answer"]
    if "crop" not in a:
        return {}
    budget, base, ref = a["reference"]["peak_mib"], a["reversible_at_reference"], result["meta"]["ref_crop"]
    out = {}
    for axis, x_of in (("crop", lambda r: r["crop"] ** 3), ("width", lambda r: r.get("width", 1)),
                       ("depth", lambda r: r["couplings"])):
        fit, nxt = a[axis]["fits"], a[axis]["next"]
        lo = base if nxt is None else fit  # largest tried: extrapolate from the reference
        hi = fit if nxt is None else nxt
        x = None
        if lo and hi and lo.get("peak_mib") is not None and hi.get("peak_mib") is not None and lo is not hi:
            x = _crossing(x_of(lo), lo["peak_mib"], x_of(hi), hi["peak_mib"], budget)
        out[axis] = x
    n0 = _depth_couplings(1)
    return {"volume_x": out["crop"] and round(out["crop"] / ref ** 3, 2), "channels_x": out["width"] and
            round(out["width"], 2), "couplings": out["depth"] and round(out["depth"]),
            "depth_x": out["depth"] and round(out["depth"] / n0, 1), "extrapolated": {
                "volume": a["crop"]["next"] is None, "channels": a["width"]["next"] is None,
                "couplings": a["depth"]["next"] is None}}


def answer_line(result: dict) -> str:
    """The one-sentence answer: what the reversible net fits at the plain twin's reference memory."""
    a, ref = result["answer"], result["meta"]["ref_crop"]
    head = f"At the plain net's {ref}^3 memory ({a['reference']['peak_mib']:,.0f} MiB) the reversible net fits: "
    if "crop" not in a:
        return head + "nothing (" + a.get("note", "") + ")"
    c, w, d = a["crop"], a["width"], a["depth"]
    more = lambda x: " or more (largest tried)" if x["largest_tried"] else ""
    return (head + f"crop {c['side']}^3 (= {c['volume_x']:.2f}x volume){more(c)}, channels x{w['channels_x']:g}"
            f"{more(w)}, couplings x{d['depth_x']:.2f} ({d['couplings']} instead of {_depth_couplings(1)}){more(d)}.")


def _peak_ratio(x: dict | None, y: dict | None) -> str:
    return f"{x['peak_mib'] / y['peak_mib']:.2f}" if x and y and x.get("peak_mib") and y.get("peak_mib") else "-"


def _secs(row: dict | None) -> str:
    return f"{row['first_step_s']:.1f}" if row and row.get("first_step_s") is not None else "-"


def _config(t: dict) -> dict:
    return t["rev"] or t["plain"]


def _fits_budget(row: dict) -> bool:
    return row.get("peak_mib") is not None and row["peak_mib"] <= row["budget"]


CROP_COLUMNS = (
    Column("crop", lambda t: f"{t['crop']}^3", "right"),
    Column("revunet3d", lambda t: _mib(t["rev"]), "right"),
    Column("unet3d_mbconv (plain twin)", lambda t: _mib(t["plain"]), "right"),
    Column("SegResNet", lambda t: _mib(t["seg"]), "right"),
    Column("rev / plain", lambda t: _peak_ratio(t["rev"], t["plain"]), "right"),
    Column("SegResNet / rev", lambda t: _peak_ratio(t["seg"], t["rev"]), "right"),
    Column("first step s (rev / plain / SegResNet)",
           lambda t: f"{_secs(t['rev'])} / {_secs(t['plain'])} / {_secs(t['seg'])}", "right"),
)
SWEEP_COLUMNS = (
    Column("channels", lambda t: f"x{t['width']:g} {tuple(_config(t)['channels'])}"),
    Column("couplings (encoder / decoder)", lambda t: f"x{t['depth']:g}: {_config(t)['couplings']} "
           f"({tuple(_config(t)['encoder_blocks'])} / {tuple(_config(t)['decoder_blocks'])})"),
    Column("params", lambda t: f"{_config(t).get('params', 0) / 1e6:.2f} M", "right"),
    Column("revunet3d", lambda t: _mib(t["rev"]), "right"),
    Column("plain twin", lambda t: _mib(t["plain"]), "right"),
    Column("rev / plain", lambda t: _peak_ratio(t["rev"], t["plain"]), "right"),
)
PROBE_COLUMNS = (
    Column("probe", lambda r: _probe_name(r)),
    Column("params", lambda r: f"{r.get('params', 0) / 1e6:.2f} M", "right"),
    Column("peak MiB", lambda r: _mib(r), "right"),
    Column("fits", lambda r: "yes" if _fits_budget(r) else "no", "center"),
    Column("first step s", lambda r: _secs(r), "right"),
)


def format_markdown(result: dict) -> str:
    """README section: setup, crop table, width/couplings table, the answer, search probes, step time."""
    meta, rows, a, o = result["meta"], result["rows"], result["answer"], result["overhead"]
    ref, sweep = meta["ref_crop"], meta["sweep_crop"]
    get = lambda model, crop, width=1, depth=1: next(
        (r for r in rows if r["model"] == model and r["crop"] == crop
         and (model == SEGRESNET or (r["width"], r["depth"]) == (width, depth))), None)
    where = ("CUDA `max_memory_allocated` above `memory_allocated`" if meta["device"].startswith("cuda") else
             "peak RSS (VmHWM) above the RSS")
    out = [f"Peak training memory of one forward + backward (BCE-with-logits, 3 regions), batch {meta['batch']}, "
           f"fp32, {meta['device']}, {meta['threads']} threads, "
           f"{'channels_last_3d' if meta['channels_last'] else 'contiguous'}, torch {meta['torch']}. Each "
           f"configuration runs in a fresh process; peak = {where} just before the step (weights, gradient "
           f"buffers, input and target already allocated), in MiB. **Reference crop: {ref}^3** (the budget is "
           f"the plain twin's peak there). SegResNet: MONAI's BraTS tutorial configuration. Step times are "
           f"first (cold) steps on a shared machine: rough. Run time {meta['seconds']} s.", "",
           table(CROP_COLUMNS, [{"crop": c, "rev": get(REVERSIBLE, c), "plain": get(PLAIN, c),
                                  "seg": get(SEGRESNET, c)} for c in meta["crops"]]),
           "", f"Width and couplings per level at {sweep}^3 (peak MiB):", ""]
    configs = sorted({(r["width"], r["depth"]) for r in rows if r["crop"] == sweep and r["model"] != SEGRESNET
                      and (r["width"] == 1 or r["depth"] == 1)})
    out.append(table(SWEEP_COLUMNS, [{"width": w, "depth": d, "rev": get(REVERSIBLE, sweep, w, d),
                                      "plain": get(PLAIN, sweep, w, d)} for w, d in configs]))
    out += ["", "**" + answer_line(result) + "**", ""]
    if "crop" in a:
        beat = lambda ok: "beats" if ok else "does not beat"
        nxt = lambda x: (f"; next ({_probe_name(x['next'])}) {_mib(x['next'])} MiB" if x["next"] else "")
        out += [f"- volume: {a['crop']['volume_x']:.2f}x ({a['crop']['side']}^3, "
                f"{_mib(a['crop']['fits'])} MiB{nxt(a['crop'])}): {beat(a['beats_paper']['volume'])} the paper's 3x",
                f"- channels: x{a['width']['channels_x']:g} {tuple(a['width']['channels'])} "
                f"({_mib(a['width']['fits'])} MiB{nxt(a['width'])}): {beat(a['beats_paper']['channels'])} "
                f"the paper's 2x",
                f"- couplings: {a['depth']['depth_x']:.2f}x, {a['depth']['couplings']} couplings, encoder "
                f"{tuple(a['depth']['encoder_blocks'])}, decoder {tuple(a['depth']['decoder_blocks'])} "
                f"({_mib(a['depth']['fits'])} MiB{nxt(a['depth'])}): {beat(a['beats_paper']['depth'])} "
                f"the paper's +25%"]
    est = interpolated(result)
    if est:
        how = lambda key: "extrapolated" if est["extrapolated"][key] else "interpolated"
        parts = [f"volume {est['volume_x']:.2f}x ({how('volume')})" if est["volume_x"] else None,
                 f"channels x{est['channels_x']:.2f} ({how('channels')})" if est["channels_x"] else None,
                 f"~{est['couplings']} couplings = {est['depth_x']:.1f}x ({how('couplings')})"
                 if est["couplings"] else None]
        out.append("- where the budget is crossed, on a line between the probes: "
                   + ", ".join(p for p in parts if p))
    seg = a.get("segresnet_at_reference")
    if seg and seg.get("peak_mib") is not None:
        out.append(f"- MONAI SegResNet (tutorial) at {ref}^3: {seg['peak_mib']:,.0f} MiB "
                   f"({seg['peak_mib'] / a['reference']['peak_mib']:.2f}x the plain twin)")
    probes = [r for r in rows if r["purpose"] == "search"]
    if probes:
        out += ["", f"Search probes (reversible net at the {a['reference']['peak_mib']:,.0f} MiB budget; a probe "
                f"past {meta['cap_mib']:,.0f} MiB is stopped):", "",
                table(PROBE_COLUMNS, [dict(r, budget=a["reference"]["peak_mib"]) for r in probes])]
    ratio_text = f"{o['ratio']:.2f}x" if o.get("ratio") else "not measured"
    out += ["", f"Step-time overhead of reversibility at {o['crop']}^3 ({o['rounds']} fresh processes per model, "
            f"{o['steps']} steps each after a warm-up step): median step revunet3d {o['reversible_step_s']} s, plain "
            f"twin {o['plain_step_s']} s: **{ratio_text}**"
            + (f"; fastest steps {o['reversible_min_step_s']} s / {o['plain_min_step_s']} s: "
               f"{o['ratio_of_fastest']:.2f}x" if o.get("ratio_of_fastest") else "") + "."]
    est = o.get("flop_estimate")
    if est:
        out.append(f"RevNet's estimate (backward = 2x forward, plus one extra forward of what is recomputed) gives "
                   f"1.33x when every layer is reversible; here the couplings are "
                   f"{100 * est['recompute_fraction']:.0f}% "
                   f"of the forward FLOPs (stem, resampling, skips and head are not recomputed), so "
                   f"1 + {est['recompute_fraction']:.3f} / 3 = **{est['ratio']:.2f}x**.")
    out.append("")
    return "\n".join(out)


def _probe_name(row: dict) -> str:
    parts = [f"{row['crop']}^3"]
    if row.get("width", 1) != 1:
        parts.append(f"channels x{row['width']:g}")
    if row.get("depth", 1) != 1:
        parts.append(f"couplings x{row['depth']:g} ({row['couplings']})")
    return ", ".join(parts)


def memory_report(quick: bool = False, device: str = "cpu", threads: int = 2,
                  log: Callable[[str], None] | None = None, **overrides) -> tuple[dict, str]:
    """(result dict, markdown) of the FULL or QUICK preset."""
    result = memory_benchmark(**{**(QUICK if quick else FULL), **overrides}, device=device, threads=threads, log=log)
    result["meta"]["quick"] = quick
    return result, format_markdown(result)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="reference crop 48^3 instead of 128^3")
    p.add_argument("--ref-crop", type=int, help="reference crop side (default 128; --quick: 48)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--contiguous", action="store_true",
                   help="contiguous tensors instead of channels_last_3d (CPU depthwise 3D backward is ~50x slower)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="output folder for revunet_memory.json / .md")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the fork server (internal)
    args = p.parse_args(argv)
    if args.serve:
        _serve()
        return 0
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    overrides = {"channels_last": not args.contiguous}
    if args.ref_crop:
        overrides["ref_crop"] = args.ref_crop
    result, markdown = memory_report(quick=args.quick, device=args.device, threads=args.threads, log=log,
                                     **overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "revunet_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "revunet_memory.md").write_text(markdown)
    print(markdown)
    log(answer_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

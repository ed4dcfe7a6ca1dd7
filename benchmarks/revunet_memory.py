"""Peak training memory of revunet3d vs its plain twin and MONAI's SegResNet, and the paper's question.

    python benchmarks/revunet_memory.py            # reference crop 128^3 (~25 min on a busy 2-core CPU)
    python benchmarks/revunet_memory.py --quick    # the same question at 48^3 (~5 min)

Writes OUT/revunet_memory.json (meta, rows, answer, overhead) and OUT/revunet_memory.md (README
section). Every configuration runs in a fresh process (see mobilezoo/deploy/bench_memory.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobilezoo.deploy.bench_memory import answer_line, memory_report  # noqa: E402


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
    args = p.parse_args(argv)
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

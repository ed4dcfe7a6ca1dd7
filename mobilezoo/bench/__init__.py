"""One benchmark harness: model specs (ours, `timm:`, `tv:`, `monai:`), a thread context that restores,
interleaved rounds through one timing loop, statistics and one Markdown writer. The suites in
`bench.suites` (classify, detect, video, runtimes) are thin layers on top; `mobilezoo bench SUITE`
runs one."""
from .threads import num_threads
from .timing import batch1_latency_ms, interleaved_rounds, matmul_peak_gflops, time_calls

__all__ = ["batch1_latency_ms", "interleaved_rounds", "matmul_peak_gflops", "num_threads", "time_calls"]

"""torch.compile for inference: same outputs as the eager model, weights frozen, bf16 copies, runtimes cells."""
import pytest
import torch

from mobilezoo.bench.suites import runtimes as br
from mobilezoo.deploy.compiled import compile_for_inference
from mobilezoo.models import create_model


def test_compiled_model_matches_eager_and_its_weights_are_frozen():
    torch.manual_seed(0)
    model = create_model("squeezetime_mini", num_classes=8).eval()
    x = torch.randn(2, 3, 16, 32, 32)
    compiled = compile_for_inference(model)
    with torch.inference_mode():
        want, got = model(x), compiled(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        model.head.bias.add_(1.0)  # frozen: the compiled graph holds the weights as constants
        torch.testing.assert_close(compiled(x), got)
        assert not torch.allclose(model(x), got)


@pytest.mark.slow  # compiling DeepLabv3+ on tiny-MOAT-0 takes ~110 s on 2 cores
def test_compiled_segmenter_matches_eager():
    torch.manual_seed(0)
    model = create_model("deeplabv3plus", num_classes=3, aspp_channels=16, decoder_channels=16, low_level_channels=8,
                         window_size=(None, None, 2, None)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(compile_for_inference(model)(x), model(x), rtol=0, atol=1e-4)


@pytest.mark.slow  # compiling a detector takes ~23 s on 2 cores: slow, to keep `make test` under 10 minutes
def test_bf16_copy_of_a_detector_network_leaves_the_model_alone_and_agrees_with_fp32():
    torch.manual_seed(0)
    model = create_model("ssdlite_mobiledet_cpu", num_classes=3).eval()
    x = torch.randn(1, 3, 128, 128)
    compiled = compile_for_inference(model, torch.bfloat16, torch.channels_last, lambda m: m.head_outputs)
    with torch.inference_mode():
        reg, logits, sizes = model.head_outputs(x)
        reg16, logits16, sizes16 = compiled(x.bfloat16().contiguous(memory_format=torch.channels_last))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert reg16.dtype == torch.bfloat16 and list(sizes16) == list(sizes)
    torch.testing.assert_close(logits16.float(), logits, rtol=0.05, atol=0.1)
    torch.testing.assert_close(reg16.float(), reg, rtol=0.05, atol=0.1)


@pytest.mark.slow  # compiling two cells takes ~25 s on 2 cores: slow, to keep `make test` under 10 minutes
def test_compiled_runtimes_are_cells_of_the_one_table_benchmark():
    result = br.benchmark(["squeezetime_mini"], [], ("eager", "compile-bf16"), threads=1,
                          quick=True, iters=2, batch_iters=1, rounds=1)
    rows = {r["runtime"]: r for r in result["rows"]}
    assert set(rows) == {"eager", "compile-bf16"} and result["skipped"] == []
    assert rows["compile-bf16"]["macs"] == rows["eager"]["macs"] > 0
    assert result["summary"][0]["best_runtime"] in rows
    assert "PyTorch compiled bf16" in br.format_markdown(result)

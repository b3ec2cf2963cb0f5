"""The built wheel holds only the `twofold` package, and it installs beside Hugging Face's `kernels` package (the one
transformers uses for hub kernels) in one site-packages folder: both import in one process, each its own."""
import zipfile

import pytest

from tests.pip_target import pip_target, run_python

HF_KERNELS = "kernels==0.17.2"  # its requirements (huggingface_hub, packaging, pyyaml) come with transformers

CHECK = r'''
import torch
import kernels
import twofold
from twofold.kernels import linear_logprobs

assert hasattr(kernels, "get_kernel") and hasattr(kernels, "kernelize"), "not Hugging Face's kernels package"
hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
logp = twofold.linear_logprobs(hidden, weight, torch.arange(5))
assert torch.allclose(logp, (hidden @ weight.t()).log_softmax(-1)[torch.arange(5), torch.arange(5)], atol=1e-5)
assert linear_logprobs is twofold.linear_logprobs
loss, _ = twofold.nn.FusedLinearGRPOLoss(beta=0.0)(hidden[None], weight, torch.arange(5)[None],
                                                   torch.ones(1, 5), torch.ones(1))
print(kernels.__file__)
print(twofold.__file__)
'''


def test_wheel_holds_only_the_twofold_package(twofold_wheel):
    names = zipfile.ZipFile(twofold_wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"twofold", next(t for t in top if t.endswith(".dist-info"))}, top
    for module in ("twofold/__init__.py", "twofold/kernels/api.py", "twofold/objectives/nft.py",
                   "twofold/engine/train/trainer.py", "twofold/nn.py", "twofold/integrations/trl.py"):
        assert module in names


@pytest.mark.slow
def test_twofold_installs_and_imports_beside_hugging_faces_kernels(twofold_wheel, tmp_path):
    site = pip_target(tmp_path / "site-packages", str(twofold_wheel), HF_KERNELS)
    assert {p.name for p in site.iterdir() if not p.name.endswith(".dist-info")} >= {"kernels", "twofold"}
    run = run_python(CHECK, [site], cwd=tmp_path)  # the clone's root is not on the path: only what was installed
    assert run.returncode == 0, run.stdout + run.stderr
    kernels_file, twofold_file = run.stdout.split()
    assert kernels_file.startswith(str(site / "kernels")) and twofold_file.startswith(str(site / "twofold"))

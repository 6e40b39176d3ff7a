"""The build: what vqkernels._C holds, and the PyTorch path when it is missing."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from vqkernels import _backend


def _nvcc_found() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is not None and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))


def test_c_extension_was_built_with_cpu_kernels():
    assert _backend.c_extension() is not None, f"vqkernels._C did not load: {_backend.c_extension_error()}"
    assert _backend.build_info()["cpu"] is True
    assert hasattr(torch.ops.vqkernels_C, "nearest_code")


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch has no CUDA: the CUDA kernels are not built")
def test_cuda_kernels_were_built_where_nvcc_exists():
    if not _nvcc_found():
        pytest.skip("nvcc not found (CUDA_HOME): the CUDA kernels are not built")
    if os.environ.get("VQKERNELS_BUILD_CUDA", "1") == "0":
        pytest.skip("VQKERNELS_BUILD_CUDA=0")
    info = _backend.build_info()
    assert info.get("cuda") is True, f"torch has CUDA and nvcc exists, but _C holds no CUDA kernels: {info}"


def test_package_runs_on_its_pytorch_path_without_c_extension(tmp_path):
    """Simulate an install where _C could not be built: info() says so and the ops still work."""
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "vqkernels._C":
                    raise ImportError("simulated: _C not built")
        sys.meta_path.insert(0, Block())
        import torch, vqkernels
        from vqkernels import _backend
        assert _backend.c_extension() is None
        text = vqkernels.info(as_text=True)
        assert "_C: NOT BUILT" in text, text
        x, cb = torch.randn(50, 8), torch.randn(20, 8)
        idx = vqkernels.nearest_code(x, cb)
        ref = torch.cdist(x.double(), cb.double()).argmin(1)
        assert torch.equal(idx, ref), (idx, ref)
        try:
            vqkernels.nearest_code(x, cb, backend="cpu")
        except vqkernels.BackendNotSupported as e:
            assert "not built" in str(e), e
        else:
            raise AssertionError("backend='cpu' ran without _C")
        print("ok")
        """
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_cli_info_runs():
    exe = shutil.which("vqkernels")
    cmd = [exe, "info"] if exe else [sys.executable, "-m", "vqkernels", "info"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "backend each op picks here" in r.stdout

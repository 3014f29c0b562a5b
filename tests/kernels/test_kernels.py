"""The compiled kernels load at first use, a missing build is said (once), not hidden, and only the
wrappers in `pipequant.kernels` hand tensor addresses to C."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import pipequant
from pipequant import kernels

#: what pipequant/_native/kernels.c's method table holds
FUNCTIONS = ["quanto_int8", "torchao_int8", "bitsandbytes_int8", "bnb4_quantize", "ggml_quantize", "ggml_dequantize"]


def test_every_kernel_is_built():
    """setup.py builds them optionally; on a machine with a compiler (CI's) each must be there."""
    module = kernels.compiled()
    assert module is not None
    assert all(callable(getattr(module, name)) for name in FUNCTIONS)


@pytest.fixture
def unbuilt(monkeypatch):
    """As if setup.py had not built the extension (an import of it fails)."""
    monkeypatch.setitem(sys.modules, "pipequant._kernels", None)
    kernels.compiled.cache_clear()
    yield
    kernels.compiled.cache_clear()


def test_a_missing_build_is_announced_once_at_first_use(unbuilt):
    with pytest.warns(UserWarning, match="compiled kernels are not built"):
        assert kernels.compiled() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.compiled() is None


def test_without_the_build_the_libraries_quantize(unbuilt):
    """Each caller takes its slower path: the int8 rows and the GGUF codecs still give their bytes."""
    from pipequant.backends import int8_rows
    from pipequant.backends.gguf import dequantize, quantize

    weight = torch.randn(4, 64)
    with pytest.warns(UserWarning, match="not built"):
        assert int8_rows.quanto_int8_rows(weight) is None
    packed = quantize(weight, "Q8_0")
    assert packed.shape == (4, 2 * 34)
    assert (dequantize(packed, "Q8_0", weight.shape) - weight).abs().max() < 0.05
    with pytest.raises(RuntimeError, match="not built"):
        kernels.native()


def test_importing_pipequant_does_not_load_the_kernels():
    """The extension is imported at first use (so a missing build is said there, not at import)."""
    code = "import sys, pipequant, pipequant.backends.gguf.codecs; print('pipequant._kernels' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(pipequant.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_only_the_wrappers_hand_addresses_to_c():
    package = Path(pipequant.__file__).parent
    users = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if re.search(r"\.data_ptr\(\)", path.read_text())
    }
    # page_cache compares a storage's address with its file mappings' and hands it to nothing
    assert users == {"kernels/int8_rows.py", "kernels/bnb4.py", "kernels/ggml.py", "page_cache.py"}


def test_checked_takes_keywords_only():
    weight = torch.randn(4, 8)
    with pytest.raises(TypeError):
        kernels.checked(lambda t: (t,), lambda t: (t,), weight, weight[:2], "lib")  # type: ignore[misc]
    same = kernels.checked(
        kernel=lambda t: (t * 2,), library=lambda t: (t * 2,), weight=weight, head=weight[:2], library_name="lib"
    )
    assert same is not None and torch.equal(same[0], weight * 2)


def test_checked_falls_back_where_the_kernel_does_not_apply_or_disagrees():
    weight = torch.randn(4, 8)
    calls = []

    def library(head):
        calls.append(torch.get_num_threads())
        return (head + 1,)

    def check(kernel):
        return kernels.checked(kernel=kernel, library=library, weight=weight, head=weight[:2], library_name="lib")

    assert check(lambda t: None) is None
    assert calls == []  # a kernel that does not apply is not compared
    with pytest.warns(UserWarning, match="disagrees with this lib version"):
        assert check(lambda t: (t,)) is None
    assert calls == [1]  # the library ran on one thread


def test_torch_on_one_thread_restores_the_count():
    before = torch.get_num_threads()
    with kernels.torch_on_one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with kernels.torch_on_one_thread(torch.device("meta")):  # not the CPU: nothing changes
        assert torch.get_num_threads() == before
    with pytest.raises(KeyError), kernels.torch_on_one_thread(torch.device("cpu")):
        raise KeyError
    assert torch.get_num_threads() == before

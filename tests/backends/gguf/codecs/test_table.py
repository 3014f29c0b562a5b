"""The one GGML type table (`codecs.table`): gguf-py's numbers and sizes, the same list in the C kernels,
a codec for every type, and the same full set whichever module is imported first."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pipequant
from pipequant.backends.gguf import GGML_TYPES
from pipequant.backends.gguf.codecs import CODECS, GGML_TYPE_TABLE
from pipequant.backends.gguf.config import GGUFQuantizationConfig, row_nbytes

COMMON_H = Path(pipequant.__file__).parent / "_native" / "common.h"


def test_the_table_has_gguf_py_numbers_and_sizes():
    gguf = pytest.importorskip("gguf")
    for name, ggml_type in GGML_TYPE_TABLE.items():
        member = gguf.GGMLQuantizationType[name]
        assert ggml_type.type_id == member.value
        assert (ggml_type.block_size, ggml_type.type_size) == gguf.GGML_QUANT_SIZES[member]


def c_type_list() -> dict[str, tuple[int, int, int]]:
    """The C kernels' GGML_TYPE_LIST (common.h): name -> (type id, weights per block, bytes per block)."""
    source = COMMON_H.read_text()
    start = source.index("#define GGML_TYPE_LIST(GGML_TYPE)")
    definition = source[start : source.index("\n\n", start)]
    constants = {"QK_K": int(re.search(r"#define QK_K (\d+)", source).group(1))}
    entries = re.findall(r"GGML_TYPE\((\w+), (\d+), (\w+), (\d+)\)", definition)
    return {
        name: (int(type_id), constants[weights] if weights in constants else int(weights), int(nbytes))
        for name, type_id, weights, nbytes in entries
    }


def test_the_c_kernels_have_the_same_table():
    assert c_type_list() == {name: tuple(t)[1:] for name, t in GGML_TYPE_TABLE.items()}


def test_every_type_has_a_codec_with_the_table_sizes():
    assert tuple(CODECS) == GGML_TYPES == tuple(GGML_TYPE_TABLE)
    for name, codec in CODECS.items():
        assert codec.ggml_type is GGML_TYPE_TABLE[name]
        assert (codec.block_size, codec.type_size) == (
            GGML_TYPE_TABLE[name].block_size,
            GGML_TYPE_TABLE[name].type_size,
        )


def test_the_config_takes_every_type_with_the_table_sizes():
    for name in GGML_TYPES:
        assert GGUFQuantizationConfig(quant_type=name.lower()).quant_type == name
        assert row_nbytes(name, 512) == 512 // GGML_TYPE_TABLE[name].block_size * GGML_TYPE_TABLE[name].type_size


@pytest.mark.parametrize(
    "first",
    [
        "pipequant.backends.gguf.codecs.kquants",
        "pipequant.backends.gguf.codecs.legacy",
        "pipequant.backends.gguf.codecs.table",
        "pipequant.backends.gguf.config",
    ],
)
def test_any_import_order_gives_every_type(first):
    """The set used to be frozen from a registry that an import of the K-quant module first left short."""
    code = (
        f"import {first}\n"
        "from pipequant.backends.gguf import GGML_TYPES\n"
        "from pipequant.backends.gguf.codecs import CODECS\n"
        "print(' '.join(GGML_TYPES)); print(' '.join(CODECS))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(pipequant.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split("\n")[:2] == [" ".join(GGML_TYPE_TABLE)] * 2

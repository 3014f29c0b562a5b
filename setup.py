"""The compiled kernels (src/pipequant/_native); everything else about the package is in pyproject.toml.

`optional=True`: where no C compiler is at hand the install still succeeds, and pipequant uses
the slower code it has for every kernel (each library's own int8 quantizer, the torch K-quant
codecs) and says so once.
"""

from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-adds, whose single rounding would change the bytes the
# kernels must reproduce (quanto's, torchao's and llama.cpp's arithmetic, op by op).
# -Wno-psabi: the vector helpers are static and inlined, so GCC's note on passing AVX vectors
# between functions compiled for different targets does not apply.
FLAGS = ["-O3", "-std=c11", "-pthread", "-ffp-contract=off", "-Wno-psabi"]


def kernel(name: str, *parts: str) -> Extension:
    """The module pipequant._<name>, built from _native/<name>.c and the named other parts."""
    return Extension(
        f"pipequant._{name}",
        [f"src/pipequant/_native/{source}.c" for source in (name, *parts)],
        include_dirs=["src/pipequant/_native"],
        depends=[f"src/pipequant/_native/{header}.h" for header in ("parallel", "common", "ggml_quantize")],
        extra_compile_args=FLAGS,
        extra_link_args=["-pthread"],
        optional=True,
    )


setup(
    ext_modules=[
        kernel("int8_rows"),
        kernel("bnb4"),
        kernel("ggml_quantize", "ggml_legacy", "kquants"),
        kernel("ggml_dequantize"),
    ]
)

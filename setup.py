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


def kernel(name: str) -> Extension:
    return Extension(
        f"pipequant._{name}",
        [f"src/pipequant/_native/{name}.c"],
        include_dirs=["src/pipequant/_native"],
        depends=["src/pipequant/_native/parallel.h", "src/pipequant/_native/common.h"],
        extra_compile_args=FLAGS,
        extra_link_args=["-pthread"],
        optional=True,
    )


setup(ext_modules=[kernel(name) for name in ("int8_rows", "bnb4", "kquants", "ggml_legacy", "ggml_dequantize")])

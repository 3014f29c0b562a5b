"""The compiled kernels (src/pipequant/_native); everything else about the package is in pyproject.toml.

One extension module, pipequant._kernels, with one method table (_native/kernels.c) over the kernels
in the other source files. `optional=True`: where no C compiler is at hand the install still
succeeds, and pipequant uses the slower code it has for every kernel (each library's own int8
quantizer, the torch GGUF codecs) and says so once, at first use.
"""

from pathlib import Path

from setuptools import Extension, setup

NATIVE = Path("src/pipequant/_native")

# -ffp-contract=off: no fused multiply-adds, whose single rounding would change the bytes the
# kernels must reproduce (quanto's, torchao's and llama.cpp's arithmetic, op by op).
# -Wno-psabi: the vector helpers are static and inlined, so GCC's note on passing AVX vectors
# between functions compiled for different targets does not apply.
FLAGS = ["-O3", "-std=c11", "-pthread", "-ffp-contract=off", "-Wno-psabi"]

setup(
    ext_modules=[
        Extension(
            "pipequant._kernels",
            sorted(str(source) for source in NATIVE.glob("*.c")),
            include_dirs=[str(NATIVE)],
            depends=sorted(str(header) for header in NATIVE.glob("*.h")),
            extra_compile_args=FLAGS,
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)

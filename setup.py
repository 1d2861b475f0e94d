"""Build hook for the one C extension: the IPFIX codec's accelerator (ipfix/_speedups.c).

Everything else about the distribution is declared in pyproject.toml. The extension is
optional: where no compiler is at hand, ``pip install`` still succeeds and the IPFIX
library uses its pure-Python twin (ipfix/accel.py logs which one serves).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "flowscope.ipfix._speedups",
            sources=["ipfix/_speedups.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)

"""Build hook for the C extensions: the IPFIX codec's accelerator (ipfix/_speedups.c), its
data-set-to-columns decoder (ipfix/_columnar.c), the conntrack parser's (agent/_ctparse.c),
the aggregation's ingest loop (aggregator/_aggr.c) and the flow store's records-to-columns
transposition (collector/_rowcols.c).

Everything else about the distribution is declared in pyproject.toml. The extensions are
optional: where no compiler is at hand, ``pip install`` still succeeds and each uses its
pure-Python twin (ipfix/accel.py, ipfix/columnar.py, agent/ctfast.py, aggregator/aggregation.py
and collector/rows.py log which one serves).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "flowscope.ipfix._speedups",
            sources=["ipfix/_speedups.c"],
            depends=["ipfix/_dictmirror.h"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "flowscope.ipfix._columnar",
            sources=["ipfix/_columnar.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "flowscope.agent._ctparse",
            sources=["agent/_ctparse.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "flowscope.collector._rowcols",
            sources=["collector/_rowcols.c"],
            depends=["collector/_colout.h"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
        Extension(
            "flowscope.aggregator._aggr",
            sources=["aggregator/_aggr.c"],
            depends=["ipfix/_dictmirror.h", "collector/_colout.h"],
            # the dict layout mirror it shares with the codec, the output columns with the store
            include_dirs=["ipfix", "collector"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)

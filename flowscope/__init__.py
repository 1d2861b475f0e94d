"""flowscope: Kubernetes network flow visibility.

The distribution is one import namespace. Each component lives in its own top-level
folder of the repository and is mapped here by pyproject.toml:

- ``flowscope.ipfix``      IPFIX library (RFC 7011/7012/5103), sans-IO codec plus transports
- ``flowscope.agent``      the Flow Exporter (conntrack -> connection store -> IPFIX)
- ``flowscope.aggregator`` the Flow Aggregator (IPFIX mediator: collect, correlate, aggregate)
- ``flowscope.collector``  the flow collector (decode, log, ClickHouse, dashboards)
- ``flowscope.operator``   the kopf operator reconciling the custom resources
"""

__version__ = "0.1.0"

import os as _os

# In a source checkout (an editable install, the test suite) the component folders sit
# beside this one. setuptools' editable finder cannot map a sub-package that has no
# __init__.py (operator/ must not have one, or `import operator` from the repository root
# would load our folder instead of the standard library), so the checkout's root joins
# this package's search path. Installed wheels lay the components out under flowscope/
# and never take this branch.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _os.path.isfile(
    _os.path.join(_root, "ipfix", "__init__.py")
):
    __path__.append(_root)

"""portmesh: prove that every port a Kubernetes cluster needs is open between every pair of hosts.

The import package is ``scanner``; keep this module free of heavy imports so that
``portmesh --version`` starts fast.
"""

__version__ = "0.1.0"
SCHEMA_VERSION = 1

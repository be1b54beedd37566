"""steph: cross-cancer knowledge transfer for whole-slide-image survival prediction."""

# Bit-identical reruns: MKL reads MKL_CBWR when it initialises (its first call), so it is set
# here, before any module of steph imports torch (see steph.utils.reproducibility).
from steph.utils.reproducibility import request_mkl_cnr as _request_mkl_cnr

_request_mkl_cnr()

__version__ = "0.1.0"

"""Representation transfer (method.md section 6): ROUPKT and the simpler transfer rows read the
bag embeddings of frozen models (the target's own fold-k model and every source's fold-0 model)
instead of merging their weights.

  experts.py  ExpertBank: the frozen models, self first; content digests of their weights
  cache.py    the experts' inputs of a run, computed once, kept in its run directory
  roupkt.py   ROUPKT (router + top-k experts + fresh head) and ExpertReadout (a fresh head on
              the mean of some experts' embeddings: linear probe, fusion_mean); artefact kinds
              "roupkt" and "expert_readout"
"""

from steph.transfer.cache import CACHE_FILE, ExpertEmbeddings, expert_embeddings
from steph.transfer.experts import ExpertBank, state_digest
from steph.transfer.roupkt import EXPERTS_INPUT, ROUPKT, ExpertReadout

__all__ = [
    "CACHE_FILE",
    "EXPERTS_INPUT",
    "ROUPKT",
    "ExpertBank",
    "ExpertEmbeddings",
    "ExpertReadout",
    "expert_embeddings",
    "state_digest",
]

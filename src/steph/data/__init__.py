"""steph.data: label tables, feature files, cohorts, folds, the bag Dataset, summaries.

The synthetic cohort generator lives in :mod:`steph.data.synthetic` (import it directly).
"""

from steph.data.cohort import Cohort, discover_cohorts
from steph.data.dataset import BagDataset, ConcatBags, subsample_indices
from steph.data.features import (
    WSI_EXTENSIONS,
    FeatureIndex,
    find_feature_file,
    read_coords,
    read_feature_shape,
    read_features,
    read_features_stored,
    strip_wsi_extension,
    write_features_h5,
    write_features_pt,
)
from steph.data.labels import CONVENTIONS, ENDPOINTS, detect_convention, read_labels
from steph.data.pack import PackedStore, check_pack, write_pack
from steph.data.splits import (
    Split,
    check_split,
    check_splits,
    create_splits,
    load_or_create_splits,
    read_splits,
    write_splits,
)
from steph.data.summary import format_summary, summarize_cohort, summarize_cohorts

__all__ = [
    "CONVENTIONS",
    "ENDPOINTS",
    "WSI_EXTENSIONS",
    "BagDataset",
    "Cohort",
    "ConcatBags",
    "FeatureIndex",
    "PackedStore",
    "Split",
    "check_pack",
    "check_split",
    "check_splits",
    "create_splits",
    "detect_convention",
    "discover_cohorts",
    "find_feature_file",
    "format_summary",
    "load_or_create_splits",
    "read_coords",
    "read_feature_shape",
    "read_features",
    "read_features_stored",
    "read_labels",
    "read_splits",
    "strip_wsi_extension",
    "subsample_indices",
    "summarize_cohort",
    "summarize_cohorts",
    "write_features_h5",
    "write_features_pt",
    "write_pack",
    "write_splits",
]

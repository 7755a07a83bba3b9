"""The graph layer: tracing with leaf policies, stage discovery, site matchers, splicing."""

from .layers import LeafTracer, is_leaf, norm_types, register_leaf, register_norm
from .shapes import ShapeRecord, record_calls
from .sites import Site, find_sites, insert_sites, trace_modes
from .splice import graph_source, is_spliced, original_class, splice_after, splice_graph, unsplice
from .stages import Stage, find_stages, stage_of_shape
from .units import Unit, find_units

__all__ = [
    "LeafTracer",
    "is_leaf",
    "norm_types",
    "register_leaf",
    "register_norm",
    "ShapeRecord",
    "record_calls",
    "Site",
    "find_sites",
    "insert_sites",
    "trace_modes",
    "graph_source",
    "is_spliced",
    "original_class",
    "splice_after",
    "splice_graph",
    "unsplice",
    "Stage",
    "find_stages",
    "stage_of_shape",
    "Unit",
    "find_units",
]

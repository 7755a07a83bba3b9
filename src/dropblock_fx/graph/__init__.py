"""The graph layer: leaf policy, tracing, the shape pass, stages, units, site matchers, splicing."""

from .leaves import is_leaf, norm_types, register_norm
from .shapes import ShapeRecord, record_calls
from .sites import Site, find_sites, insert_sites
from .splice import graph_source, is_spliced, original_class, splice_after, splice_graph, unsplice
from .stages import Stage, StageMap, find_stages, map_stages, stage_of_shape
from .specialise import trace_specialised
from .tracing import LeafTracer, trace_modes
from .units import Unit, find_units

__all__ = [
    "LeafTracer",
    "is_leaf",
    "norm_types",
    "register_norm",
    "ShapeRecord",
    "record_calls",
    "Site",
    "find_sites",
    "insert_sites",
    "trace_modes",
    "trace_specialised",
    "graph_source",
    "is_spliced",
    "original_class",
    "splice_after",
    "splice_graph",
    "unsplice",
    "Stage",
    "StageMap",
    "map_stages",
    "find_stages",
    "stage_of_shape",
    "Unit",
    "find_units",
]

"""DyDiT inference engine: per-timestep width plans, sliced weights, capacity-bounded tokens."""

from dydit_jax.dynamic.engine import DyDiTEngine, parse_capacity, slice_attention, slice_mlp
from dydit_jax.dynamic.plan import WidthPlan, width_plan

__all__ = [
    "DyDiTEngine", "WidthPlan", "parse_capacity", "slice_attention", "slice_mlp", "width_plan",
]

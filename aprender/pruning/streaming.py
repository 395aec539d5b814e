"""Compatibility names: the checkpoint sources and the streamed global plan now live in the
selection engine, :mod:`aprender.pruning.selection`."""
from .selection import GlobalPlan, MappedUnit, WandaUnit, typed_rows, wanda_units

__all__ = ["GlobalPlan", "MappedUnit", "WandaUnit", "wanda_units", "typed_rows"]

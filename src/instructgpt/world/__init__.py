"""The instruction world: seeded facts, a pretraining corpus, task prompts and a scripted labeler."""

from .corpus import WorldSizes, write_world
from .labeler import DEFAULT_NOISE, WEIGHTS, Labeler, Score
from .world import FAMILIES, HELD_OUT_FAMILIES, World, build_world, demonstrate

__all__ = [
    "DEFAULT_NOISE", "FAMILIES", "HELD_OUT_FAMILIES", "WEIGHTS", "Labeler", "Score", "World", "WorldSizes",
    "build_world", "demonstrate", "write_world",
]

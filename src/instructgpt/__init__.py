"""instructgpt: the InstructGPT recipe from scratch, end to end."""

__version__ = "0.1.0"

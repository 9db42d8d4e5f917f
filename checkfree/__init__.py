"""CheckFree: pipeline-parallel LLaMA training on unreliable machines, with checkpoint-free recovery."""

__version__ = "0.1.0"

"""ReLLaX shared model code: used by training and serving alike (docs/design.md §2)."""

__all__: list[str] = []

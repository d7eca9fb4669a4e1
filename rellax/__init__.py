"""ReLLaX shared model code: used by training and serving alike (DESIGN §2)."""

__all__: list[str] = []

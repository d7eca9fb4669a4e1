"""Offline pipeline: data preparation, the CTR model (DIN), stage-1/2 trainers, evaluation, export."""

__all__: list[str] = []

"""Online scoring service: FastAPI app, Redis history store, micro-batcher, backends, metrics."""

__all__: list[str] = []

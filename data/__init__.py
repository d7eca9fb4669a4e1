"""The data layer both sides import: reading a data set's files, the sample protocol, and loading.

Training, the index build and the CLIs read data through this package; the service reads the same
interactions to load histories. Nothing here imports torch or the model code.
"""

__all__: list[str] = []

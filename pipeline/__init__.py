"""I/O: dataset converters, DALI view graphs, loaders."""

__all__ = ["build_loader"]


def __getattr__(name):
    # Lazy: `python -m pipeline.convert` should not import DALI and torch.
    if name == "build_loader":
        from pipeline.loader import build_loader
        return build_loader
    raise AttributeError(name)

"""Progress bars for long work (scoring decisions, fits, training steps)."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    """A tqdm bar with ETA on a terminal; silent when stderr is not a TTY (logs, pipes, batch jobs)."""
    kwargs.setdefault("disable", None)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)

"""The application: a run's settings (`config`), one training run (`train`), the comparison grids (`compare`,
`transfer`), their reports and figures, signal propagation plots (`spp`) and the command line (`cli`).

Importing ``normfree.app`` loads none of them (``normfree/__init__.py`` imports `startup` from here before
anything else); ``__all__`` names the modules a program imports from, each with its own ``__all__``:
``from normfree.app.compare import CompareConfig``. The others serve the command line and these.
"""
__all__ = ["compare", "config", "report", "spp", "train", "transfer"]

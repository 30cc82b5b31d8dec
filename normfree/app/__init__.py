"""The application: a run's settings (`config`), one training run (`train`), the comparison grids (`compare`,
`transfer`), their reports and figures, signal propagation plots (`spp`) and the command line (`cli`).
"""

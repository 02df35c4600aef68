"""What each cell (denoising step x cache block) of a cache plan says to do. Torch-free, so
exported backends read the plans in their manifests without torch."""

COMPUTE, REUSE, FORECAST, GATE = 0, 1, 2, 3  # recompute; reuse the cached residual; extrapolate it; decide at run time
OP_NAMES = {COMPUTE: "compute", REUSE: "reuse", FORECAST: "forecast", GATE: "gate"}  # as plots and dashboards say
# The names indexed by code, as a plan's description carries them: ops[code] reads the same in Python and
# after a JSON round trip (a map's int keys come back as strings)
OP_LIST = [OP_NAMES[code] for code in range(len(OP_NAMES))]

"""Running a compiled module: load + checks, runner, devices, vamp, npz route, result files, and the
KServe v2 / Triton protocol server (serve/).

Imports neither tvmzoo.compile nor tvmzoo.models: a deployed module needs neither."""

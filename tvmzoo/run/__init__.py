"""Running a compiled module: load + checks, runner, devices, vamp, npz route, result files.

Imports neither tvmzoo.compile nor tvmzoo.models: a deployed module needs neither."""

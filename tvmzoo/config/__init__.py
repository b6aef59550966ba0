"""The vendor build YAML -> typed, validated, frozen dataclasses.

    cfg = load_build_config("build_in/build/official_repvgg.yaml", {"backend.dtype": "fp16"})

The vendor files are accepted as they are (`backend.type: tvm_vacc`, `compile:` hardware knobs,
`dataset.sampler`, `graph.extra_ops.type`, `workspace.path`); tvmzoo's additions are optional keys
(`backend.target`, `backend.quantize.percentile` and friends, `graph.preprocess`, `model:`,
`tuning:`). Relative paths in the YAML are resolved against the *current working directory*, as
the vendor tools do (their YAMLs say `./deploy_weights/` and are run from the model folder), not
against the YAML's own directory.

Every problem is one ConfigError: "<file>: <key.path>: <what is wrong>. <how to fix>". Unknown
keys are errors (with a close-match suggestion), except under `backend.compile` (vendor hardware
knobs: accepted, logged at debug level, ignored) and the vendor quantize / workspace keys.

The modules: spec.py (the dataclasses and the values each key allows), validate.py (the generic
schema walk), schema.py (the build YAML's schema and loader), overrides.py (`--set key.path=value`).
"""
from .overrides import apply_overrides, parse_set
from .schema import MAX_VALUES, build_config_from_dict, load_build_config
from .spec import (BACKEND_ALIASES, BACKEND_TYPES, CALIBRATE_ALIASES, CALIBRATE_MODES, DATASET_TYPES, EXTRA_OPS,
                   FRONTEND_TYPES, PERCENTILE_RANGE, PRECISIONS, PREPROCESS_MODES, Backend, BuildConfig, Dataset,
                   Frontend, Graph, ModelSpec, Quantize)

__all__ = ["BACKEND_ALIASES", "BACKEND_TYPES", "CALIBRATE_ALIASES", "CALIBRATE_MODES", "DATASET_TYPES", "EXTRA_OPS",
           "FRONTEND_TYPES", "MAX_VALUES", "PERCENTILE_RANGE", "PRECISIONS", "PREPROCESS_MODES", "Backend",
           "BuildConfig", "Dataset", "Frontend", "Graph", "ModelSpec", "Quantize", "apply_overrides",
           "build_config_from_dict", "load_build_config", "parse_set"]

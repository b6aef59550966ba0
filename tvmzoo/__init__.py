"""tvmzoo: the vendor model-zoo flow (build YAML, vamc, runstream, vamp, eval_topk) on Apache TVM."""

__version__ = "0.1.0"

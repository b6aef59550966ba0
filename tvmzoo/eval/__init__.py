"""Accuracy: eval_topk on result files and the accuracy harness."""

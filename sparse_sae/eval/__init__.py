"""Evaluation of trained SAEs: reconstruction and sparsity, monosemanticity, ground-truth
feature recovery, robustness to the inference k, small-budget probing, and the report.

>>> from sparse_sae.eval import evaluate, write_report, monosemanticity
>>> report = evaluate(sae, "acts/", embeddings="dino_embeddings.npy", labels="labels.npy")
>>> write_report(report, "eval_out")          # report.json, report.md, *.npy, *.png
"""
from sparse_sae.eval.evaluate import evaluate, load_array
from sparse_sae.eval.metrics import ReconstructionStats, density_histogram, reconstruction_metrics
from sparse_sae.eval.monosemanticity import MonosemanticityAccumulator, monosemanticity, summarize_ms
from sparse_sae.eval.probing import SparseCodes, fit_logistic, probe, top_latents_per_class
from sparse_sae.eval.recovery import feature_recovery, linear_sum_assignment
from sparse_sae.eval.report import markdown, write_report
from sparse_sae.eval.robustness import forward_at_k, inference_k, k_values

__all__ = ["evaluate", "write_report", "markdown", "load_array", "monosemanticity", "MonosemanticityAccumulator",
           "summarize_ms", "ReconstructionStats", "reconstruction_metrics", "density_histogram",
           "feature_recovery", "linear_sum_assignment", "probe", "fit_logistic", "top_latents_per_class",
           "SparseCodes", "k_values", "inference_k", "forward_at_k"]

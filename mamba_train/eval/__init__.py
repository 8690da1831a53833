from mamba_train.eval.perplexity import evaluate, format_table

__all__ = ["evaluate", "format_table"]

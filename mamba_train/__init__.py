"""mamba-train: pretraining Mamba-2 language models at scale."""

"""fellrec: federated fine-tuning of LLM-based recommenders."""

__version__ = "0.1.0"

"""The combination methods and their options, torch-free so the CLI can list them without importing torch."""

METHODS = ("linear", "svd", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
LOW_RANK_METHODS = ("linear", "svd", "cat")  # exact on factors: no dense matrix is formed
SIGN_RULES = ("total", "frequency")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
MODULES_TO_SAVE_CHOICES = ("refuse", "split")

"""A PyTorch Lightning template for studying why deep MLPs stop learning."""

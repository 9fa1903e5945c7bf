"""Control plane: job submission and tracking."""

"""sbibm experiment (issue 7): amortize-then-refine vs neural posterior estimation."""

"""Model-merging baselines (method.md section 6); registered as methods on import."""

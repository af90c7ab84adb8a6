"""Device catalog, hardware detection, training-memory estimator and the tier planner."""

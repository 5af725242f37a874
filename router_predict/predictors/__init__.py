"""Routing predictors, one per file; build them by name with router_predict.registry.build_predictor."""

"""Pure tensor math, torch only (no Lightning, no models): masked reductions, returns, losses,
KL estimators and controllers, normalisation, token log-probs."""

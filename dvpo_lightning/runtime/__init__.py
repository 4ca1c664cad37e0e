"""Run infrastructure: atomic checkpoint IO and RNG state, numerical guards, hardware checks,
loggers, collectives, artifacts."""

"""Study reports: tables, plots and token-value pictures."""

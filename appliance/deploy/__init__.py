"""The deployment controller: the two-phase workflow (Kadeploy's three macro-steps) as data, run per node set."""

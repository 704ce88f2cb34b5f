"""`chatforge bench ...`: speed measurements that print a table (one module per subject)."""

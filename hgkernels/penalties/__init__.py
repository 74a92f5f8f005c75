"""The penalties, one module each, on the plan contract of `penalties.base`."""

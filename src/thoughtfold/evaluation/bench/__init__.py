"""Benchmarks that print tables and draw plots (`thoughtfold bench`)."""

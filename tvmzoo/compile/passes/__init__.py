"""Relax graph rewrites of the compile pipeline."""

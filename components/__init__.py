"""Plugins: one file per component. Every module here is imported by `registry.discover()`."""

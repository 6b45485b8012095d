"""Diagnostics: how tasks help or hurt each other."""

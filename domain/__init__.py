"""Shared domain types of rackboot: errors, nodes, boot profiles and the node-progress vocabulary.

The bottom of the import graph: every other package may import this one, and it imports nothing of
the project (an import-linter contract keeps it so).
"""

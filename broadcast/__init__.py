"""Broadcast of images, deploy agent and tree remote execution (later issues)."""

"""Scaling-law fits from run directories.

Empty until the scaling-law module lands (issue 9).
"""

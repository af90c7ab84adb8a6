"""Attacks on a running system by someone who can reach the broker: each must change nothing."""

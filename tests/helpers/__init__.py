"""Test helpers: closed-form bundle fixtures, live servers, deployment stacks."""

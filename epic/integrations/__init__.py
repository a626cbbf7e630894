"""EPIC inside other training frameworks; each integration imports its framework lazily."""

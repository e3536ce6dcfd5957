"""Runnable pipelines and the ``capfilt`` command line; they use the ``capfilt`` library."""

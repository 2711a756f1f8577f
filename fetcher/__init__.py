"""fetch: a fast, polite, incremental parallel mirror downloader for HTTP directory listings."""

__version__ = "0.1.0"

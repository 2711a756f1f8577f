from fetcher.cli import entry

entry()

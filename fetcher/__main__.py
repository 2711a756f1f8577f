from fetcher.console import entry

if __name__ == "__main__":  # spawned workers import this module again
    entry()
